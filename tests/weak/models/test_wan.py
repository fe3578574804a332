"""Weak model on Wan 2.1/2.2 (T2V and I2V), WanVACE and SkyReels-V2 (tiny random configs)."""
import torch
from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel

from ._harness import ModelCase, WeakModelTests, value_identity

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
           text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, rope_max_seq_len=32)


def skip_block(model, i):
    model.blocks[i].forward = lambda hidden_states, *args, **kwargs: hidden_states


def identity_attn1(model, i):
    value_identity(model.blocks[i].attn1)


def case(name, cls, inputs, **config):
    return ModelCase(name=name, build=lambda: cls(**{**WAN, **config}).eval(), inputs=inputs, n_layers=3,
                     reference_residual=skip_block, reference_attention=identity_attn1,
                     layer_paths=lambda i: f"blocks.{i}")


class TestWanT2V(WeakModelTests):
    case = case("wan-t2v", WanTransformer3DModel, lambda: dict(
        hidden_states=torch.randn(2, 4, 3, 8, 8), timestep=torch.tensor([500, 500]),
        encoder_hidden_states=torch.randn(2, 8, 32)))


class TestWanI2V(WeakModelTests):
    # Image tokens reach attn2 only (text length is fixed at 512 there); attn1 stays video-only.
    case = case("wan-i2v", WanTransformer3DModel, lambda: dict(
        hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 512, 32), encoder_hidden_states_image=torch.randn(1, 4, 16)),
        image_dim=16, added_kv_proj_dim=32)


class TestSkyReelsV2DiffusionForcing(WeakModelTests):
    # Block-causal self-attention mask in diffusion-forcing mode; per-frame timesteps.
    case = case("skyreels-v2-df", SkyReelsV2Transformer3DModel, lambda: dict(
        hidden_states=torch.randn(2, 4, 3, 8, 8), timestep=torch.full((2, 3), 500.0),
        encoder_hidden_states=torch.randn(2, 8, 32), enable_diffusion_forcing=True), num_frame_per_block=3)
