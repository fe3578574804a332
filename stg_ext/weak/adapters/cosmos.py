"""Cosmos 1.0 / 2.0 / 2.5 (CosmosTransformer3DModel).

Blocks: `transformer_blocks`, called positionally
`(hidden_states, encoder_hidden_states, embedded_timestep, temb, image_rotary_emb, extra_pos_emb, attention_mask,
controlnet_residual)`, returning the hidden states. The block does work of its own before and after its
sub-layers: it adds the learnable positional embedding `extra_pos_emb` (Cosmos 1.0) to its input first (and,
in Cosmos-Transfer, `before_proj` / `controlnet_residual`). STG-R skips all of it: a skipped block returns the
`hidden_states` it received, before the positional embedding was added (STG_SPEC section 3).

Self-attention `attn1` (`CosmosAttnProcessor2_0`) sees video tokens only: per-head RMSNorm on Q/K and RoPE
act on Q/K; K and V are widened to the query's head size with `repeat_interleave(..., dim=3)` when their
projection is narrower (the processor's "GQA" step, which repeats features within each of the `heads` heads).
The identity map is therefore `to_out(widen(to_v(x)))`, written out in `cosmos_value_only`. `attn2` is the
text (and Cosmos 2.5 image) cross-attention and stays untouched.
"""
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import register_adapter
from .base import ModelAdapter, has_plain_value_path


def cosmos_value_only(attn: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Identity self-attention of a Cosmos `attn1`: each token's (widened) value, then `to_out`."""
    value = attn.to_v(hidden_states)
    query_head_dim = attn.to_q.out_features // attn.heads
    value = value.unflatten(2, (attn.heads, -1))
    if value.shape[-1] != query_head_dim:
        value = value.repeat_interleave(query_head_dim // value.shape[-1], dim=-1)
    out = value.flatten(2, 3)
    for layer in attn.to_out:
        out = layer(out)
    return out


@register_adapter
class CosmosAdapter(ModelAdapter):
    model_classes = ("CosmosTransformer3DModel",)

    def value_only_fn(self, attn: nn.Module) -> Optional[Callable[..., Any]]:
        if not has_plain_value_path(attn) or not isinstance(getattr(attn, "to_q", None), nn.Linear):
            return None
        return cosmos_value_only
