"""Weak model on LTX-Video (tiny random config, packed (B, F*H*W, C) input)."""
import torch
from diffusers import LTXVideoTransformer3DModel

from ._harness import ModelCase, WeakModelTests, value_identity


def skip_block(model, i):
    model.transformer_blocks[i].forward = lambda hidden_states, *args, **kwargs: hidden_states


class TestLTXVideo(WeakModelTests):
    case = ModelCase(
        name="ltx-video",
        build=lambda: LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                                 num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                                                 num_layers=3, caption_channels=32).eval(),
        inputs=lambda: dict(hidden_states=torch.randn(2, 3 * 4 * 4, 8), encoder_hidden_states=torch.randn(2, 6, 32),
                            timestep=torch.tensor([500, 500]), encoder_attention_mask=torch.ones(2, 6),
                            num_frames=3, height=4, width=4),
        n_layers=3,
        reference_residual=skip_block,
        reference_attention=lambda model, i: value_identity(model.transformer_blocks[i].attn1),
        layer_paths=lambda i: f"transformer_blocks.{i}",
    )
