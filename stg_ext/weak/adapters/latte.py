"""Latte (LatteTransformer3DModel): factorized, a layer is the pair (`transformer_blocks[i]`,
`temporal_transformer_blocks[i]`) (STG_SPEC section 3, "Factorized models").

Both blocks are `BasicTransformerBlock`s, called positionally `(hidden_states, attention_mask,
encoder_hidden_states, encoder_attention_mask, timestep, cross_attention_kwargs, class_labels)`, returning the
hidden states. Their `attn1` is video-only self-attention (`AttnProcessor2_0`: over the patches of one frame
in the spatial block, over the frames of one patch in the temporal block); the spatial block's `attn2` is the
text cross-attention and stays untouched (the temporal block has no `attn2`).

Modes:
- "residual": both blocks of the pair return their hidden-states input. Latte adds `temp_pos_embed` at model
  level before the temporal block of layer 0; that is not part of either block and still happens.
- "attention": both `attn1`s are the identity (each token's output is its value, then `to_out`);
- "spatial" / "temporal": only the spatial / temporal block's `attn1`.

A layer is addressed by its index or by the module path of either of its blocks (`"transformer_blocks.3"` or
`"temporal_transformer_blocks.3"` both name layer 3). With `enable_temporal_attentions=False` the temporal
blocks do not run, so "temporal" perturbs nothing and "residual"/"attention" act on the spatial block only.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

from torch import nn

from . import register_adapter
from .base import AttentionTarget, Layer, ModelAdapter, has_plain_value_path, plain_value_only

SPATIAL_BLOCKS = "transformer_blocks"
TEMPORAL_BLOCKS = "temporal_transformer_blocks"


def check_self_attention(attn: nn.Module, path: str) -> None:
    if getattr(attn, "is_cross_attention", False):
        raise ValueError(f"stg_ext: {path} is a cross-attention (only_cross_attention block); STG-A needs a "
                         "self-attention there")


#: diffusers processors that compute plain softmax attention between their projections and `to_out`, with
#: `spatial_norm` / `group_norm` / `residual_connection` / `rescale_output_factor` as the only extras.
PLAIN_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


def basic_value_only_fn(attn: nn.Module) -> Optional[Callable[..., Any]]:
    """Fast STG-A path for a diffusers `Attention` self-attention: `to_out(to_v(x))`, or None (exact SDPA
    interception) when that would not be exactly what the module computes under the identity map.

    `AttnProcessor2_0` also applies `spatial_norm`, `group_norm`, `residual_connection` and
    `rescale_output_factor` around the attention; all are off in Latte's and SVD's `attn1` (checked here per
    module, so a model configured otherwise takes the exact path). `AttnProcessor` (what
    `set_default_attn_processor()` installs) computes the same thing without SDPA. Other processors (PAG,
    IP-Adapter, custom ones) may do more than attend: no fast path for them.
    """
    if (
        type(getattr(attn, "processor", None)).__name__ not in PLAIN_PROCESSORS
        or getattr(attn, "is_cross_attention", False)
        or not has_plain_value_path(attn)
    ):
        return None
    return _plain_value_only_any_rank


def _plain_value_only_any_rank(module: nn.Module, hidden_states, *args, **kwargs):
    if hidden_states.ndim != 4:
        return plain_value_only(module, hidden_states)
    # (B, C, H, W) input: the processor attends over the H·W positions and reshapes back, as here.
    b, c, h, w = hidden_states.shape
    out = plain_value_only(module, hidden_states.view(b, c, h * w).transpose(1, 2))
    return out.transpose(-1, -2).reshape(b, c, h, w)


@register_adapter
class LatteAdapter(ModelAdapter):
    model_classes = ("LatteTransformer3DModel",)
    block_lists = (SPATIAL_BLOCKS, TEMPORAL_BLOCKS)
    factorized = True
    # Between a pair's spatial and temporal block the model reshapes by its own batch size: no joined batches.
    joinable = False

    def layers(self, model: nn.Module) -> List[Layer]:
        spatial = model.get_submodule(SPATIAL_BLOCKS)
        temporal = model.get_submodule(TEMPORAL_BLOCKS)
        if len(spatial) != len(temporal):
            raise RuntimeError(f"stg_ext: {type(model).__name__} has {len(spatial)} spatial but {len(temporal)} "
                               "temporal blocks; Latte pairs them one to one")
        return [
            Layer(i, (f"{SPATIAL_BLOCKS}.{i}", f"{TEMPORAL_BLOCKS}.{i}"), (s, t))
            for i, (s, t) in enumerate(zip(spatial, temporal))
        ]

    # STG-R: the base class skips both blocks of the pair (skip_modules), each returning its hidden_states.

    def attention_targets(self, layer: Layer, mode: str) -> List[AttentionTarget]:
        halves = {"attention": (0, 1), "spatial": (0,), "temporal": (1,)}[mode]
        targets = []
        for half in halves:
            path = f"{layer.paths[half]}.attn1"
            attn = layer.modules[half].attn1
            check_self_attention(attn, path)
            targets.append(AttentionTarget(path, attn, None, self.value_only_fn(attn)))
        return targets

    def value_only_fn(self, attn: nn.Module) -> Optional[Callable[..., Any]]:
        return basic_value_only_fn(attn)
