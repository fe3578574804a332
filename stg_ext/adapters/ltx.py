"""LTX-Video (LTXVideoTransformer3DModel): `transformer_blocks` return the hidden states; `attn1` is
video-only self-attention (RMS-normed Q/K with rotary embeddings: none of it matters to the identity map),
`attn2` the text cross-attention."""
from . import register_adapter
from .base import ModelAdapter


@register_adapter
class LTXVideoAdapter(ModelAdapter):
    model_classes = ("LTXVideoTransformer3DModel",)
