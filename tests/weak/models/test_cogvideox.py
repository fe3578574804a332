"""Weak model on CogVideoX (tiny random configs): joint attention `attn1`, TEXT first, no text mask, shared
projections for text and video; 2B-style (sincos positions) and 5B-style (RoPE passed in by the pipeline)."""
import torch
from diffusers import CogVideoXTransformer3DModel

from ._harness import ModelCase, WeakModelTests, joint_identity




CONFIG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
              text_embed_dim=32, num_layers=3, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
              max_text_seq_length=16)


def skip_block(model, i):
    model.transformer_blocks[i].forward = (
        lambda hidden_states, encoder_hidden_states, *args, **kwargs: (hidden_states, encoder_hidden_states))


def identity_attn1(model, i):
    joint_identity(model.transformer_blocks[i].attn1, video_first=False)


def inputs(rope: bool):
    def make():
        out = dict(hidden_states=torch.randn(2, 3, 4, 16, 16), encoder_hidden_states=torch.randn(2, 16, 32),
                   timestep=torch.tensor([500, 500]))
        if rope:  # (cos, sin) over the 3 x 8 x 8 video tokens, as CogVideoXPipeline passes it
            out["image_rotary_emb"] = (torch.randn(3 * 8 * 8, 16), torch.randn(3 * 8 * 8, 16))
        return out
    return make


def case(name, rope: bool):
    config = {**CONFIG, "use_rotary_positional_embeddings": rope}
    return ModelCase(name=name, build=lambda: CogVideoXTransformer3DModel(**config).eval(), inputs=inputs(rope),
                     n_layers=3, reference_residual=skip_block, reference_attention=identity_attn1,
                     layer_paths=lambda i: f"transformer_blocks.{i}")


class TestCogVideoX5B(WeakModelTests):
    case = case("cogvideox-5b-rope", rope=True)


class TestCogVideoX2B(WeakModelTests):
    case = case("cogvideox-2b-sincos", rope=False)
