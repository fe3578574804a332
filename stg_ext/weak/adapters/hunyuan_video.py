"""HunyuanVideo (HunyuanVideoTransformer3DModel, T2V and I2V incl. image_condition_type="token_replace").

Two block lists, in execution order: `transformer_blocks` (dual-stream) then `single_transformer_blocks`
(single-stream); index i of STG_SPEC section 3 counts the dual blocks first. Both kinds (and their
TokenReplace variants) are called positionally `(hidden_states, encoder_hidden_states, temb, attention_mask,
image_rotary_emb, token_replace_emb, first_frame_num_tokens)` and return `(hidden_states,
encoder_hidden_states)`: the model keeps the two streams apart between blocks, single blocks concatenate and
split them internally, so STG-R returns both inputs of any block.

Self-attention is `attn` (not attn1), joint, video first. The dual block's processor projects video and text
separately and concatenates `[V; T]`; the single block's (a `pre_only` Attention, no output projections)
concatenates `[V; T]` before projecting — either way the SDPA call sees the module's `hidden_states` (video)
first, then the text. Padded text is hidden by a boolean key mask `[B, 1, 1, N_v + N_t]` passed to SDPA,
which the interception honours (padded text keys stay invisible to video queries).
"""
from . import register_adapter
from .base import JointLayout, ModelAdapter


@register_adapter
class HunyuanVideoAdapter(ModelAdapter):
    model_classes = ("HunyuanVideoTransformer3DModel",)
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    block_returns = ("hidden_states", "encoder_hidden_states")
    self_attention = ("attn",)
    joint = JointLayout(video_first=True)
