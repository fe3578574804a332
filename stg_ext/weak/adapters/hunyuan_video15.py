"""HunyuanVideo 1.5 (HunyuanVideo15Transformer3DModel): dual-stream `transformer_blocks`, called positionally
`(hidden_states, encoder_hidden_states, temb, encoder_attention_mask, image_rotary_emb)`, returning
`(hidden_states, encoder_hidden_states)`.

Self-attention `attn` is joint, video first: the processor concatenates `[V; T]` after the separate
projections (T = image + byT5 + MLLM tokens, valid ones first). It builds a 2-D boolean mask
`m_i & m_j` of shape `(B, 1, N_v + N_t, N_v + N_t)` and passes it to SDPA; the interception takes the
video rows of that mask (video queries see themselves and the valid text keys) and the text rows for the
text queries (unchanged, padded text queries stay fully masked as in the model).
"""
from . import register_adapter
from .base import JointLayout, ModelAdapter


@register_adapter
class HunyuanVideo15Adapter(ModelAdapter):
    model_classes = ("HunyuanVideo15Transformer3DModel",)
    block_returns = ("hidden_states", "encoder_hidden_states")
    self_attention = ("attn",)
    joint = JointLayout(video_first=True)
