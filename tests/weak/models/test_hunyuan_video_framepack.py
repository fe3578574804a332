"""Weak model on HunyuanVideo FramePack (tiny random config): HunyuanVideo's blocks (2 dual-stream + 2
single-stream: STG layers 0, 1 dual; 2, 3 single), joint attention `attn`, video first; the video stream carries
the packed clean, 2x and 4x history tokens, the text stream the image-projection tokens; right-padded text hidden by a
boolean key mask."""
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel

from ._harness import ModelCase, WeakModelTests
from .test_hunyuan_video import TwoBlockLists, identity_attn, path, skip_block

CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
              num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
              pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=24,
              has_clean_x_embedder=True)


def inputs():
    return dict(hidden_states=torch.randn(2, 4, 3, 8, 8), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 8, 32),
                encoder_attention_mask=torch.tensor([[1] * 5 + [0] * 3, [1] * 8]),
                pooled_projections=torch.randn(2, 16), image_embeds=torch.randn(2, 3, 24),
                indices_latents=torch.arange(3), latents_clean=torch.randn(2, 4, 2, 8, 8),
                indices_latents_clean=torch.tensor([0, 4]), latents_history_2x=torch.randn(2, 4, 2, 8, 8),
                indices_latents_history_2x=torch.tensor([5, 6]), latents_history_4x=torch.randn(2, 4, 4, 8, 8),
                indices_latents_history_4x=torch.tensor([7, 8, 9, 10]), guidance=torch.tensor([6000.0, 6000.0]))


class TestHunyuanVideoFramepack(TwoBlockLists, WeakModelTests):
    case = ModelCase(name="hunyuan-video-framepack",
                     build=lambda: HunyuanVideoFramepackTransformer3DModel(**CONFIG).eval(),
                     inputs=inputs, n_layers=4, reference_residual=skip_block, reference_attention=identity_attn,
                     layer_paths=path)

