"""LTX-Video (LTXVideoTransformer3DModel): `transformer_blocks` return the hidden states; `attn1` is
video-only self-attention (RMS-normed Q/K with rotary embeddings: none of it matters to the identity map),
`attn2` the text cross-attention."""
from . import register_adapter
from .base import ModelAdapter


@register_adapter
class LTXVideoAdapter(ModelAdapter):
    model_classes = ("LTXVideoTransformer3DModel",)
    # LTX computes its rotary table per sample, (batch, tokens, dim): it is per-sample data, split with the batch.
    shared_inputs = tuple(name for name in ModelAdapter.shared_inputs if name != "image_rotary_emb")
