"""Weak model on Allegro (tiny random config): `transformer_blocks` with video-only `attn1` (RoPE from the
pipeline, optional video-token padding mask) and text cross-attention `attn2`."""
import torch
from diffusers import AllegroTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

from ._harness import ModelCase, WeakModelTests, value_identity




CONFIG = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=3,
              cross_attention_dim=24, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8)
FRAMES, HEIGHT, WIDTH = 2, 8, 8  # latent size; patch_size 2 -> 2 x 4 x 4 video tokens


def build():
    return AllegroTransformer3DModel(**CONFIG).eval()


def rotary_emb():
    """What AllegroPipeline._prepare_rotary_positional_embeddings passes as image_rotary_emb (the grid is the
    patch grid; the interpolation scales are the model's config defaults, interpolation_scale_t/h/w)."""
    grid_h, grid_w = HEIGHT // 2, WIDTH // 2  # patch_size 2
    freqs_t, freqs_h, freqs_w, t, h, w = get_3d_rotary_pos_embed_allegro(
        embed_dim=CONFIG["attention_head_dim"], crops_coords=((0, 0), (grid_h, grid_w)), grid_size=(grid_h, grid_w),
        temporal_size=FRAMES, interpolation_scale=(2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(t.long(), h.long(), w.long()).reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1)
    return (freqs_t, freqs_h, freqs_w), tuple(pos.contiguous())


def skip_block(model, i):
    model.transformer_blocks[i].forward = lambda hidden_states, *args, **kwargs: hidden_states


def identity_attn1(model, i):
    value_identity(model.transformer_blocks[i].attn1)


def case(name, inputs):
    return ModelCase(name=name, build=build, inputs=inputs, n_layers=3, reference_residual=skip_block,
                     reference_attention=identity_attn1, layer_paths=lambda i: f"transformer_blocks.{i}")


class TestAllegroRoPE(WeakModelTests):
    # The pipeline's call: 3-D RoPE and a padded text mask.
    case = case("allegro-rope", lambda: dict(
        hidden_states=torch.randn(2, 4, FRAMES, HEIGHT, WIDTH), encoder_hidden_states=torch.randn(2, 8, 8),
        timestep=torch.tensor([500, 500]), encoder_attention_mask=torch.tensor([[1] * 6 + [0] * 2, [1] * 8]),
        image_rotary_emb=rotary_emb()))


class TestAllegroVideoMask(WeakModelTests):
    # No RoPE; a video-token padding mask reaches attn1 as a key bias (irrelevant to the identity map).
    case = case("allegro-video-mask", lambda: dict(
        hidden_states=torch.randn(2, 4, FRAMES, HEIGHT, WIDTH), encoder_hidden_states=torch.randn(2, 8, 8),
        timestep=torch.tensor([500, 500]),
        attention_mask=torch.cat([torch.ones(2, FRAMES, HEIGHT, WIDTH - 2), torch.zeros(2, FRAMES, HEIGHT, 2)], -1)))
