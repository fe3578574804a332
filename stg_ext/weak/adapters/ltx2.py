"""LTX-2 audio-video (LTX2VideoTransformer3DModel).

Blocks: `transformer_blocks`, called with keywords, returning `(hidden_states, audio_hidden_states)` (video
first): STG-R returns both streams unchanged. STG-A makes both self-attentions the identity, the video
`attn1` and the audio `audio_attn1` (each sees its own modality only), exactly as LTX-2's own
`spatio_temporal_guidance_blocks` path does with `perturbed_attn=True` (`LTX2PerturbedAttnProcessor` with
`all_perturbed`): the output is `to_out(gate * to_v(x))`, where the optional per-head gate
`2 * sigmoid(to_gate_logits(x))` (configs with `gated_attn` / `audio_gated_attn`) multiplies each head's value
before the output projection. Q, K, the QK-norms, RoPE and the self-attention mask play no part. The text,
audio-to-video and video-to-audio cross-attentions stay untouched.
"""
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import register_adapter
from .base import ModelAdapter


def ltx2_value_only(attn: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Identity self-attention of an LTX2Attention, in LTX2PerturbedAttnProcessor's own order of operations."""
    out = attn.to_v(hidden_states)
    if attn.to_gate_logits is not None:
        gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))  # [B, T, H]
        out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    return out


@register_adapter
class LTX2Adapter(ModelAdapter):
    model_classes = ("LTX2VideoTransformer3DModel",)
    block_returns = ("hidden_states", "audio_hidden_states")
    self_attention = ("attn1", "audio_attn1")

    def value_only_fn(self, attn: nn.Module) -> Optional[Callable[..., Any]]:
        to_v, to_out = getattr(attn, "to_v", None), getattr(attn, "to_out", None)
        if not isinstance(to_v, nn.Linear) or to_out is None or not hasattr(attn, "to_gate_logits"):
            return None
        if to_v.out_features != to_out[0].in_features:
            return None  # fewer K/V heads than query heads: leave it to the exact SDPA interception
        return ltx2_value_only
