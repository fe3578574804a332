"""CogVideoX (CogVideoXTransformer3DModel: 2B with sincos positions, 5B / 1.5 with RoPE from the pipeline).

`transformer_blocks` are called with keywords (positionally under gradient checkpointing) and return
`(hidden_states, encoder_hidden_states)`. Self-attention `attn1` is joint, TEXT first: the processor
concatenates `[T; V]` before the shared projections and calls SDPA without a mask (every text token,
padded T5 ones included, is a key), then applies `to_out` to the whole sequence and splits it. The
interception only replaces the SDPA call, so the shared output projection runs as usual.
"""
from . import register_adapter
from .base import JointLayout, ModelAdapter


@register_adapter
class CogVideoXAdapter(ModelAdapter):
    model_classes = ("CogVideoXTransformer3DModel",)
    block_returns = ("hidden_states", "encoder_hidden_states")
    joint = JointLayout(video_first=False)
