"""Weak model on EasyAnimate (tiny random config): joint attention `attn1`, TEXT first, no mask; block 0 is
an MMDiT block (separate text projections, to_add_out), blocks 1 and 2 share the projections."""
import torch
from diffusers import EasyAnimateTransformer3DModel

from ._harness import ModelCase, WeakModelTests, joint_identity




def skip_block(model, i):
    # Called positionally with 4 arguments; returns (video, text).
    model.transformer_blocks[i].forward = (
        lambda hidden_states, encoder_hidden_states, *args, **kwargs: (hidden_states, encoder_hidden_states))


def identity_attn1(model, i):
    joint_identity(model.transformer_blocks[i].attn1, video_first=False)


class TestEasyAnimate(WeakModelTests):
    case = ModelCase(
        name="easyanimate",
        build=lambda: EasyAnimateTransformer3DModel(attention_head_dim=16, num_attention_heads=2, in_channels=4,
                                                    out_channels=4, mmdit_layers=1, num_layers=3, patch_size=2,
                                                    sample_height=60, sample_width=90, text_embed_dim=16,
                                                    time_embed_dim=8).eval(),
        inputs=lambda: dict(hidden_states=torch.randn(2, 4, 2, 16, 16), timestep=torch.tensor([500, 500]),
                            encoder_hidden_states=torch.randn(2, 16, 16)),
        n_layers=3,
        reference_residual=skip_block,
        reference_attention=identity_attn1,
        layer_paths=lambda i: f"transformer_blocks.{i}",
    )
