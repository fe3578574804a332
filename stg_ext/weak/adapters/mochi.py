"""Mochi (MochiTransformer3DModel): joint attention, video tokens first.

Blocks return `(hidden_states, encoder_hidden_states)` (the last block is context-pre-only and returns its
text input unchanged). Mochi's processor drops padded text tokens per sample before calling SDPA, so the
text part of each SDPA call is exactly the valid text.
"""
from . import register_adapter
from .base import JointLayout, ModelAdapter


@register_adapter
class MochiAdapter(ModelAdapter):
    model_classes = ("MochiTransformer3DModel",)
    block_returns = ("hidden_states", "encoder_hidden_states")
    joint = JointLayout(video_first=True)
