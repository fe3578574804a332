"""Wan 2.1 / 2.2 (WanTransformer3DModel, incl. I2V), WanVACE, and SkyReels-V2 (same block layout).

Blocks: `blocks`, called positionally `(hidden_states, encoder_hidden_states, temb, rotary_emb[, mask])`,
returning the hidden states. Self-attention `attn1` sees video tokens only (SkyReels-V2's diffusion-forcing
mask is block-causal with the diagonal always allowed, so the identity map needs no mask); `attn2` is the
text (and I2V image) cross-attention and stays untouched. WanVACE's `vace_blocks` are a control branch and
are not STG layers.
"""
from . import register_adapter
from .base import ModelAdapter


@register_adapter
class WanAdapter(ModelAdapter):
    model_classes = ("WanTransformer3DModel", "WanVACETransformer3DModel", "SkyReelsV2Transformer3DModel")
    block_lists = ("blocks",)
