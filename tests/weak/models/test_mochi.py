"""Weak model on Mochi: joint attention, video first, padded text dropped per sample."""
import torch
from diffusers import MochiTransformer3DModel

from ._harness import ModelCase, WeakModelTests, joint_identity


def skip_block(model, i):
    model.transformer_blocks[i].forward = (
        lambda hidden_states, encoder_hidden_states, *args, **kwargs: (hidden_states, encoder_hidden_states))


class TestMochi(WeakModelTests):
    case = ModelCase(
        name="mochi",
        build=lambda: MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=3,
                                              pooled_projection_dim=16, in_channels=12, text_embed_dim=32,
                                              time_embed_dim=16, max_sequence_length=16).eval(),
        inputs=lambda: dict(hidden_states=torch.randn(2, 12, 3, 8, 8), encoder_hidden_states=torch.randn(2, 16, 32),
                            timestep=torch.tensor([500, 500]),
                            encoder_attention_mask=torch.tensor([[1] * 10 + [0] * 6, [1] * 16])),
        n_layers=3,
        reference_residual=skip_block,
        reference_attention=lambda model, i: joint_identity(model.transformer_blocks[i].attn1, video_first=True),
        layer_paths=lambda i: f"transformer_blocks.{i}",
    )
