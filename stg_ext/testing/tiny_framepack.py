"""A tiny, random-weight, offline HunyuanVideoFramepackPipeline (the stock class), for CPU tests.

Kept out of tiny.py's FAMILIES: its latent output is a list (one history tensor per section), which the tests
parametrized over every tiny family do not take. Same parts as tiny.py's HunyuanVideo (transformer config of
tests/weak/models/test_hunyuan_video_framepack.py, the tiny HunyuanVideo VAE), plus a one-layer SigLIP vision
encoder and its PIL image processor, built in memory.

FramePack samples in sections, each a denoising run of its own (set_timesteps again), conditioned on the image
(SigLIP embeddings and its VAE latents) and the history latents of the sections before; true CFG as HunyuanVideo's.
With latent_window_size=2, 5 frames are one section of 2 latent frames and 9 frames two sections; `.frames` with
latent output is the list of the history latents after each section (the last holds every generated frame;
latent_shape is its shape after one section: the image's latent frame + 2).

    tp = tiny_framepack()
    sections = tp.pipe(**tp.call_kwargs(steps=2, num_frames=9)).frames   # 2 tensors
"""
from __future__ import annotations

from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline,
                       HunyuanVideoFramepackTransformer3DModel)

from .tiny import FamilySpec, TinyPipeline, hunyuan_call, random_image, seeded

__all__ = ["tiny_framepack"]

SIZE = 64  # pixels: 8 x 8 latents under the VAE's 8x


def _call(pipe, gen, cfg):
    return dict(hunyuan_call(pipe, gen, cfg), image=random_image(gen, SIZE, SIZE), latent_window_size=2)


def _build(seed, text, vae):
    import transformers
    from transformers import SiglipVisionConfig, SiglipVisionModel

    transformer = seeded(seed, lambda: HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=24,
        has_clean_x_embedder=True))
    vae_ = seeded(seed, lambda: AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4))
    # hidden_size = the transformer's image_proj_dim (its image projection takes SigLIP's last hidden state).
    image_encoder = seeded(seed, lambda: SiglipVisionModel(SiglipVisionConfig(
        hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=16)))
    # The PIL backend: SiglipImageProcessor falls back to it anyway (with a warning) when torchvision is absent.
    processor_cls = getattr(transformers, "SiglipImageProcessorPil", transformers.SiglipImageProcessor)
    feature_extractor = processor_cls(size={"height": 32, "width": 32})
    return HunyuanVideoFramepackPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=vae_, transformer=transformer, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, image_encoder=image_encoder,
        feature_extractor=feature_extractor)


_SPEC = FamilySpec(build=_build, sizes=lambda pipe: dict(num_frames=5, height=SIZE, width=SIZE), call=_call,
                   denoiser_attrs=("transformer",), num_layers=4, latent_shape=(1, 4, 3, 8, 8), needs_vae=True)


def tiny_framepack(*, seed: int = 0) -> TinyPipeline:
    """The stock HunyuanVideoFramepackPipeline from tiny random parts (weights from `seed`); prompt_embeds only."""
    pipe = _SPEC.build(seed, {}, True)
    pipe.set_progress_bar_config(disable=True)
    return TinyPipeline(family="hunyuan_video_framepack", pipe=pipe, denoiser_attrs=_SPEC.denoiser_attrs,
                        num_layers=_SPEC.num_layers, latent_shape=_SPEC.latent_shape, frames=5, size=(SIZE, SIZE),
                        _spec=_SPEC)
