"""Allegro (AllegroTransformer3DModel).

Blocks: `transformer_blocks`, called with keywords, returning the hidden states. Self-attention `attn1` is a
diffusers `Attention` with `AllegroAttnProcessor2_0` over video tokens only: no QK-norm; the 3-D RoPE
(`image_rotary_emb`, computed by the pipeline) and the optional video-token padding bias
(`attention_mask`) act on Q/K and the scores only, so the identity map is `to_out(to_v(x))`. `attn2` is the
text cross-attention and stays untouched.
"""
from typing import Any, Callable, Optional

from torch import nn

from . import register_adapter
from .base import ModelAdapter


def _plain_attention(attn: nn.Module) -> bool:
    # AllegroAttnProcessor2_0 also honours these Attention options; Allegro builds attn1 with their defaults.
    # Anything else: use the exact SDPA interception instead of re-implementing the processor.
    return (
        getattr(attn, "spatial_norm", None) is None
        and getattr(attn, "group_norm", None) is None
        and not getattr(attn, "residual_connection", False)
        and getattr(attn, "rescale_output_factor", 1.0) == 1.0
    )


@register_adapter
class AllegroAdapter(ModelAdapter):
    model_classes = ("AllegroTransformer3DModel",)

    def value_only_fn(self, attn: nn.Module) -> Optional[Callable[..., Any]]:
        return super().value_only_fn(attn) if _plain_attention(attn) else None
