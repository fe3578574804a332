"""Allegro (AllegroTransformer3DModel).

Blocks: `transformer_blocks`, called with keywords, returning the hidden states. Self-attention `attn1` is a
diffusers `Attention` with `AllegroAttnProcessor2_0` over video tokens only: no QK-norm; the 3-D RoPE
(`image_rotary_emb`, computed by the pipeline) and the optional video-token padding bias
(`attention_mask`) act on Q/K and the scores only, so the identity map is `to_out(to_v(x))`. `attn2` is the
text cross-attention and stays untouched.
"""
from . import register_adapter
from .base import ModelAdapter


@register_adapter
class AllegroAdapter(ModelAdapter):
    # AllegroAttnProcessor2_0 also honours Attention's spatial_norm / group_norm / residual_connection /
    # rescale_output_factor; the base class's value-only guard falls back to the exact interception when any
    # of them is set (Allegro builds attn1 with their defaults).
    model_classes = ("AllegroTransformer3DModel",)
