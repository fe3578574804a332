"""HunyuanVideo FramePack (HunyuanVideoFramepackTransformer3DModel, HunyuanVideoFramepackPipeline).

The blocks are HunyuanVideo's own (`HunyuanVideoTransformerBlock`, `HunyuanVideoSingleTransformerBlock`), in the
same two lists, called positionally `(hidden_states, encoder_hidden_states, temb, attention_mask,
image_rotary_emb)`: what differs is before the blocks. The video stream carries the packed history tokens (the
clean, 2x and 4x history latents, patch-embedded) ahead of the latents being denoised, and the text stream the
image-projection tokens ahead of the text; the model keeps only the last tokens of the video stream after the
blocks. STG perturbs the whole video stream of a block (history tokens included: they are video tokens the
block's self-attention mixes), as it does on HunyuanVideo.
"""
from . import register_adapter
from .hunyuan_video import HunyuanVideoAdapter


@register_adapter
class HunyuanVideoFramepackAdapter(HunyuanVideoAdapter):
    model_classes = ("HunyuanVideoFramepackTransformer3DModel",)
