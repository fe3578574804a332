"""Weak model on HunyuanVideo 1.5 (tiny random T2V config): joint attention `attn`, video first, with the
2-D boolean mask `m_i & m_j` the processor builds over [video; image + byT5 + MLLM tokens] (padded MLLM,
padded byT5 and — in T2V — all image tokens are masked)."""
import torch
from diffusers import HunyuanVideo15Transformer3DModel

from ._harness import ModelCase, WeakModelTests, joint_identity




CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
              num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
              image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")


def skip_block(model, i):
    # Called positionally with 5 arguments; returns (video, text).
    model.transformer_blocks[i].forward = (
        lambda hidden_states, encoder_hidden_states, *args, **kwargs: (hidden_states, encoder_hidden_states))


def identity_attn(model, i):
    joint_identity(model.transformer_blocks[i].attn, video_first=True)


class TestHunyuanVideo15(WeakModelTests):
    case = ModelCase(
        name="hunyuan-video-1.5",
        build=lambda: HunyuanVideo15Transformer3DModel(**CONFIG).eval(),
        inputs=lambda: dict(hidden_states=torch.randn(2, 4, 2, 8, 8), timestep=torch.tensor([500.0, 500.0]),
                            encoder_hidden_states=torch.randn(2, 6, 16),
                            encoder_attention_mask=torch.tensor([[1] * 4 + [0] * 2, [1] * 6]),
                            encoder_hidden_states_2=torch.randn(2, 4, 8),
                            encoder_attention_mask_2=torch.tensor([[1] * 3 + [0], [1] * 4]),
                            image_embeds=torch.zeros(2, 3, 12)),
        n_layers=3,
        reference_residual=skip_block,
        reference_attention=identity_attn,
        layer_paths=lambda i: f"transformer_blocks.{i}",
    )
