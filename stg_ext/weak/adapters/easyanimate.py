"""EasyAnimate (EasyAnimateTransformer3DModel): `transformer_blocks`, the first `mmdit_layers` of them MMDiT
(separate text projections and `to_add_out`), the rest with shared projections. Blocks are called
positionally `(hidden_states, encoder_hidden_states, temb, image_rotary_emb)` and return
`(hidden_states, encoder_hidden_states)`.

Self-attention `attn1` is joint, TEXT first (`[T; V]` in both block kinds), with no mask: the pipeline's
prompt mask never reaches the transformer, so every text token is a key.
"""
from . import register_adapter
from .base import JointLayout, ModelAdapter


@register_adapter
class EasyAnimateAdapter(ModelAdapter):
    model_classes = ("EasyAnimateTransformer3DModel",)
    block_returns = ("hidden_states", "encoder_hidden_states")
    joint = JointLayout(video_first=False)
