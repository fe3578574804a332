"""Tiny, random-weight, fully offline diffusers video pipelines (CPU tests and the offline demo).

`tiny_pipeline(family)` assembles the STOCK diffusers pipeline class of a model family from tiny components
built in memory (nothing is downloaded or read from disk), and `TinyPipeline.call_kwargs()` gives the keyword
arguments of a short, deterministic run:

    tp = tiny_pipeline("wan")
    latents = tp.pipe(**tp.call_kwargs(steps=3)).frames       # tp.latent_shape
    video = tp.pipe(**tp.call_kwargs(output_type="np")).frames  # tp.frames frames of tp.size

The denoisers use the configs of tests/weak/models (3 blocks; HunyuanVideo 2 dual + 2 single), so that STG layer
choices are meaningful. Text conditioning comes as random `prompt_embeds` drawn from the call's seed;
`text_encoder=True` (mochi, ltx, cogvideox, wan, wan22) adds a tiny tokenizer and text encoder so that
`call_kwargs(prompt="a cat")` lets the pipeline encode the prompt itself.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from diffusers import (AllegroPipeline, AllegroTransformer3DModel, AutoencoderKL, AutoencoderKLAllegro,
                       AutoencoderKLCogVideoX, AutoencoderKLHunyuanVideo, AutoencoderKLHunyuanVideo15,
                       AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, AutoencoderKLLTXVideo, AutoencoderKLMagvit,
                       AutoencoderKLMochi, AutoencoderKLTemporalDecoder, AutoencoderKLWan, CogVideoXDDIMScheduler,
                       CogVideoXPipeline, CogVideoXTransformer3DModel, Cosmos2VideoToWorldPipeline,
                       CosmosTransformer3DModel, DDIMScheduler, EasyAnimatePipeline, EasyAnimateTransformer3DModel,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                       HunyuanVideo15Transformer3DModel, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel,
                       LTX2Pipeline, LTX2VideoTransformer3DModel, LTXImageToVideoPipeline, LTXPipeline,
                       LTXVideoTransformer3DModel, LattePipeline, LatteTransformer3DModel, MochiPipeline,
                       MochiTransformer3DModel, SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel,
                       StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel, UniPCMultistepScheduler,
                       WanPipeline, WanTransformer3DModel)
from diffusers.configuration_utils import ConfigMixin
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

__all__ = ["FAMILIES", "FamilySpec", "TinyPipeline", "hunyuan_call", "random_image", "seeded", "tiny_pipeline"]

TEXT_LEN = 8  # tokens of the random prompt embeddings, and the tokenizer's max length
CFG_SCALE = 4.5


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------

@dataclass
class TinyPipeline:
    """A stock pipeline built from tiny parts, with what tests need to know about it."""

    family: str
    pipe: Any  # the stock diffusers pipeline (a DiffusionPipeline), assembled from tiny parts
    denoiser_attrs: Tuple[str, ...]  # pipeline attributes holding the denoiser(s) that STG patches
    num_layers: int  # STG layers of each tiny denoiser (as stg_ext's adapter counts them)
    latent_shape: Tuple[int, ...]  # shape of pipe(**call_kwargs()).frames (output_type="latent")
    frames: int  # decoded frames per video (output_type="np" / "pil")
    size: Tuple[int, int]  # decoded (height, width)
    _spec: "FamilySpec" = field(repr=False)

    def call_kwargs(self, *, seed: int = 0, steps: int = 3, cfg: bool = True, **overrides) -> dict:
        """A fresh dict for `pipe(**kw)`: random text embeddings (and image input) drawn from `seed`, the tiny
        sizes, `steps` inference steps, latent output, a seeded CPU generator and CFG on (scale > 1) or, with
        `cfg=False`, no negative inputs and the guidance that turns the pipeline's CFG off; then `overrides`.

        `prompt=` in the overrides (pipelines built with `text_encoder=True`) drops the random embeddings, so
        the pipeline encodes the prompt (and an empty negative prompt) itself."""
        gen = torch.Generator("cpu").manual_seed(seed)
        kw = dict(self._spec.sizes(self.pipe))
        kw.update(self._spec.call(self.pipe, gen, cfg))
        kw.update(num_inference_steps=steps, output_type="latent", generator=torch.Generator("cpu").manual_seed(seed))
        if "prompt" in overrides:
            kw = self._text_mode(kw, cfg)
        kw.update(overrides)
        return kw

    def _text_mode(self, kw: dict, cfg: bool) -> dict:
        if getattr(self.pipe, "text_encoder", None) is None:
            raise ValueError(f"{self.family}: build with tiny_pipeline(..., text_encoder=True) to pass a prompt")
        kw = {k: v for k, v in kw.items() if "prompt_embeds" not in k and "prompt_attention_mask" not in k}
        if cfg:
            kw["negative_prompt"] = ""
        if "max_sequence_length" in inspect.signature(type(self.pipe).__call__).parameters:
            kw["max_sequence_length"] = TEXT_LEN  # else the pipelines pad to 226-512 tokens
        return kw


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------

def seeded(seed: int, build: Callable[[], Any]):
    """Build one component right after torch.manual_seed(seed): each part's weights depend only on the seed."""
    torch.manual_seed(seed)
    out = build()
    return out.eval() if isinstance(out, torch.nn.Module) else out


def _scale(cfg: bool) -> float:
    """The CFG scale: > 1 turns CFG on; exactly 1 turns it off in every pipeline here."""
    return CFG_SCALE if cfg else 1.0


def _randn(gen: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _mask(n_valid: int, n: int = TEXT_LEN) -> torch.Tensor:
    """A (1, n) text mask padded at the end, as a tokenizer pads a short prompt."""
    mask = torch.zeros(1, n, dtype=torch.long)
    mask[:, :n_valid] = 1
    return mask


def _embeds(gen: torch.Generator, cfg: bool, dim: int, *, n: int = TEXT_LEN, mask: bool = False,
            pooled: Optional[int] = None) -> dict:
    """Random text conditioning under the usual diffusers names: prompt_embeds (+ attention masks, pooled
    embeds), and the negatives only when cfg (several pipelines run their CFG branch whenever negatives exist)."""
    out = {"prompt_embeds": _randn(gen, 1, n, dim)}
    if mask:
        out["prompt_attention_mask"] = _mask(n - 2, n)
    if pooled:
        out["pooled_prompt_embeds"] = _randn(gen, 1, pooled)
    if cfg:
        out["negative_prompt_embeds"] = _randn(gen, 1, n, dim)
        if mask:
            out["negative_prompt_attention_mask"] = _mask(n // 2, n)
        if pooled:
            out["negative_pooled_prompt_embeds"] = _randn(gen, 1, pooled)
    return out


def random_image(gen: torch.Generator, height: int, width: int):
    """A small RGB PIL image made from the seed (image-conditioned pipelines)."""
    from PIL import Image

    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _video_sizes(latent_frames: int, latent_hw: int, t_ratio: int, s_ratio: int) -> dict:
    """Pixel sizes that give `latent_frames` x `latent_hw` x `latent_hw` latents under causal (1 + k*t) framing."""
    return dict(num_frames=(latent_frames - 1) * t_ratio + 1, height=latent_hw * s_ratio, width=latent_hw * s_ratio)


def _t5_tokenizer():
    """A T5 (sentencepiece-unigram) tokenizer from an in-memory vocabulary: no files, no hub."""
    from transformers import T5Tokenizer

    words = ["a", "cat", "dog", "video", "of", "the", "running", "on", "grass", "red", "blue", "car", "in", "city"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = TEXT_LEN
    return tokenizer


def _t5_text(seed: int, dim: int, umt5: bool = False) -> dict:
    """Tokenizer + a one-layer (UM)T5 encoder of width `dim` (the tiny transformers' text width)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer()
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(vocab_size=len(tokenizer), d_model=dim, d_ff=2 * dim, d_kv=dim // 2, num_heads=2,
                        num_layers=1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return {"tokenizer": tokenizer, "text_encoder": seeded(seed, lambda: model_cls(config))}


def _wan_vae(z_dim: int = 4):
    """AutoencoderKLWan at the stock 8x spatial / 4x temporal compression, 3 base channels. latents_mean/std
    must have z_dim entries (the pipelines view them as (1, z_dim, 1, 1, 1))."""

    return AutoencoderKLWan(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                            latents_std=[1.0] * z_dim)


def _ddim():
    """DDIM (eta 0: deterministic) on the linear beta schedule, without x0 clipping: the default clip_sample=True
    clamps the few-step latents of random weights to [-1, 1]."""

    return DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)


# The Wan-style transformer config of tests/weak/models/test_wan.py (Wan 2.1/2.2 and SkyReels-V2).
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, rope_max_seq_len=32)


# --------------------------------------------------------------------------------------------------
# Families: one builder each, registered with its call keywords and data
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FamilySpec:
    build: Callable[[int, dict, bool], Any]  # (seed, text components, vae) -> pipeline
    sizes: Callable[[Any], dict]  # pipe -> num_frames/height/width keywords (from the pipe's VAE ratios)
    call: Callable[[Any, torch.Generator, bool], dict]  # (pipe, generator, cfg) -> conditioning + guidance
    denoiser_attrs: Tuple[str, ...]
    num_layers: int
    latent_shape: Tuple[int, ...]
    text: Optional[Callable[[int], dict]] = None  # tiny tokenizer + text encoder, where supported
    needs_vae: bool = False  # the pipeline uses its VAE even for latent output (image encoding, channel checks)


_FAMILIES: Dict[str, FamilySpec] = {}


def _family(name: str, **spec):
    def register(build):
        _FAMILIES[name] = FamilySpec(build=build, **spec)
        return build

    return register


# ---- Mochi ------------------------------------------------------------------------------------------
# MochiPipeline hard-codes 8x spatial / 6x temporal compression: 13 frames of 64x64 -> 3 x 8 x 8 latents.

@_family("mochi", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 12, 3, 8, 8),
         sizes=lambda pipe: _video_sizes(3, 8, 6, 8),
         call=lambda pipe, gen, cfg: dict(_embeds(gen, cfg, 32, mask=True), guidance_scale=_scale(cfg)),
         text=lambda seed: _t5_text(seed, 32))
def _mochi(seed, text, vae):
    transformer = seeded(seed, lambda: MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=3, pooled_projection_dim=16,
        in_channels=12, text_embed_dim=32, time_embed_dim=16, max_sequence_length=16))
    # 32 channels: the Mochi VAE's group norms have 32 groups.
    vae_ = seeded(seed, lambda: AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1))) if vae else None
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae_, transformer=transformer, **text)


# ---- LTX-Video (T2V and I2V) -------------------------------------------------------------------------
# Latents are packed (B, F*H*W, C) on output. LTX requires masks with embeds, and height/width divisible by 32.
# The tiny VAE compresses 4x (space and time): 9 frames of 32x32 -> 3 x 8 x 8 latents; without a VAE the pipeline
# assumes 32x / 8x, hence sizes from the pipe.

def _ltx_sizes(pipe):
    return _video_sizes(3, 8, pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio)


def _ltx_call(pipe, gen, cfg):
    return dict(_embeds(gen, cfg, 32, mask=True), guidance_scale=_scale(cfg))


def _ltx_i2v_call(pipe, gen, cfg):
    sizes = _ltx_sizes(pipe)
    return dict(_ltx_call(pipe, gen, cfg), image=random_image(gen, sizes["height"], sizes["width"]))


def _ltx_parts(seed, vae):
    transformer = seeded(seed, lambda: LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=3, caption_channels=32))
    # The diffusers fast-test VAE: patch 1, two space-time downsamplings, no timestep conditioning.
    vae_ = seeded(seed, lambda: AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False)) if vae else None
    return dict(transformer=transformer, vae=vae_)


@_family("ltx", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 192, 8), sizes=_ltx_sizes,
         call=_ltx_call, text=lambda seed: _t5_text(seed, 32))
def _ltx(seed, text, vae):
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), **_ltx_parts(seed, vae), **text)


@_family("ltx_i2v", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 192, 8), sizes=_ltx_sizes,
         call=_ltx_i2v_call, needs_vae=True)
def _ltx_i2v(seed, text, vae):
    return LTXImageToVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), **_ltx_parts(seed, vae), **text)


# ---- CogVideoX ----------------------------------------------------------------------------------------
# 5B-style (RoPE computed by the pipeline; no text masks). Latents come out (B, F, C, H, W). Overrides may add
# `use_dynamic_cfg=True` (the scale then follows a cosine ramp per step; CFG on/off is still guidance_scale > 1).

@_family("cogvideox", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 3, 4, 8, 8),
         sizes=lambda pipe: _video_sizes(3, 8, pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial),
         call=lambda pipe, gen, cfg: dict(_embeds(gen, cfg, 32), guidance_scale=_scale(cfg)),
         text=lambda seed: _t5_text(seed, 32))
def _cogvideox(seed, text, vae):
    transformer = seeded(seed, lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=3, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        max_text_seq_length=16, use_rotary_positional_embeddings=True))
    vae_ = seeded(seed, lambda: AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)) if vae else None
    scheduler = CogVideoXDDIMScheduler(timestep_spacing="trailing", prediction_type="v_prediction",
                                       rescale_betas_zero_snr=True, beta_schedule="scaled_linear", clip_sample=False)
    return CogVideoXPipeline(scheduler=scheduler, vae=vae_, transformer=transformer, **text)


# ---- Wan 2.1 / Wan 2.2 (two experts) / SkyReels-V2 -------------------------------------------------------
# Separate cond / uncond calls; CFG runs iff guidance_scale > 1.

def _wan_sizes(pipe):
    return _video_sizes(3, 8, pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial)


def _wan_call(pipe, gen, cfg):
    return dict(_embeds(gen, cfg, 32), guidance_scale=_scale(cfg))


def _wan_scheduler():
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


@_family("wan", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 4, 3, 8, 8), sizes=_wan_sizes,
         call=_wan_call, text=lambda seed: _t5_text(seed, 32, umt5=True))
def _wan(seed, text, vae):
    transformer = seeded(seed, lambda: WanTransformer3DModel(**_WAN))
    return WanPipeline(scheduler=_wan_scheduler(), vae=seeded(seed, _wan_vae) if vae else None,
                       transformer=transformer, **text)


# boundary 0.8 x 1000 train steps: steps at t >= 800 go to `transformer` (high noise), the rest to `transformer_2`.
# With shift 3, 2, 3 and 4 steps all use both experts (t = 1000, 9 | 1000, 751, 9 | 1000, 858, 602, 9).
# guidance_scale_2 (the low-noise expert's scale) defaults to guidance_scale; CFG on/off follows guidance_scale.
WAN22_BOUNDARY_RATIO = 0.8


@_family("wan22", denoiser_attrs=("transformer", "transformer_2"), num_layers=3, latent_shape=(1, 4, 3, 8, 8),
         sizes=_wan_sizes, call=_wan_call, text=lambda seed: _t5_text(seed, 32, umt5=True))
def _wan22(seed, text, vae):
    transformer = seeded(seed, lambda: WanTransformer3DModel(**_WAN))
    transformer_2 = seeded(seed + 1, lambda: WanTransformer3DModel(**_WAN))  # a different expert
    return WanPipeline(scheduler=_wan_scheduler(), vae=seeded(seed, _wan_vae) if vae else None,
                       transformer=transformer, transformer_2=transformer_2, boundary_ratio=WAN22_BOUNDARY_RATIO,
                       **text)


@_family("skyreels_v2", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 4, 3, 8, 8),
         sizes=_wan_sizes, call=_wan_call)
def _skyreels_v2(seed, text, vae):
    transformer = seeded(seed, lambda: SkyReelsV2Transformer3DModel(**_WAN))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    return SkyReelsV2Pipeline(scheduler=scheduler, vae=seeded(seed, _wan_vae) if vae else None,
                              transformer=transformer, **text)


# ---- HunyuanVideo ------------------------------------------------------------------------------------
# CFG is "true CFG": it runs iff true_cfg_scale > 1 AND negative embeds (+ pooled) are given. guidance_scale is
# the distilled-guidance embedding (passed to the transformer as guidance * 1000), not CFG: left at its default.

def hunyuan_call(pipe, gen, cfg):
    return dict(_embeds(gen, cfg, 32, mask=True, pooled=16), true_cfg_scale=_scale(cfg))


@_family("hunyuan_video", denoiser_attrs=("transformer",), num_layers=4, latent_shape=(1, 4, 3, 8, 8),
         sizes=lambda pipe: _video_sizes(3, 8, pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial),
         call=hunyuan_call)
def _hunyuan_video(seed, text, vae):
    transformer = seeded(seed, lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)))
    vae_ = seeded(seed, lambda: AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4)) if vae else None
    return HunyuanVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=vae_,
                                transformer=transformer, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                tokenizer_2=None)


# ---- Allegro -------------------------------------------------------------------------------------------
# Batched [uncond, cond]; masks are required with embeds. Its latent framing: an odd num_frames n gives
# ceil((n - 1) / 4) + 1 latent frames. negative_prompt defaults to "", which may not come with negative embeds.

def _allegro_call(pipe, gen, cfg):
    return dict(_embeds(gen, cfg, 8, mask=True), guidance_scale=_scale(cfg), negative_prompt=None)


@_family("allegro", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 4, 2, 8, 8),
         sizes=lambda pipe: _video_sizes(2, 8, pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial),
         call=_allegro_call)
def _allegro(seed, text, vae):
    transformer = seeded(seed, lambda: AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=3,
        cross_attention_dim=24, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8))
    vae_ = None
    if vae:
        vae_ = seeded(seed, lambda: AutoencoderKLAllegro(
            in_channels=3, out_channels=3, down_block_types=("AllegroDownBlock3D",) * 4,
            up_block_types=("AllegroUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4))
        # The Allegro VAE only decodes tiled, in fixed tiles of 24 frames x sample_size^2 pixels (overlapping by
        # 8 x 120 x 80); a video smaller than one tile decodes to zeros. One tile = the tiny video (2 latent
        # frames -> 8 frames, 64 x 64), no overlap.
        vae_.enable_tiling()
        vae_.kernel = vae_.stride = (8, 64, 64)
        vae_.tile_overlap_t = vae_.tile_overlap_h = vae_.tile_overlap_w = 0
    return AllegroPipeline(scheduler=_ddim(), vae=vae_, transformer=transformer, **text)


# ---- Cosmos (Predict2 video2world) -----------------------------------------------------------------------
# Cosmos2VideoToWorldPipeline: conditioned on an image (encoded by the VAE); the transformer takes latents + a
# condition-mask channel. CFG form: cond + w * (cond - uncond), run iff guidance_scale > 1.
# The pipeline refuses to run without a safety checker, and its default one (cosmos_guardrail) downloads
# large models: diffusers' own fast tests pass a dummy checker, as here.

def _cosmos_call(pipe, gen, cfg):
    sizes = _wan_sizes(pipe)
    return dict(_embeds(gen, cfg, 16), guidance_scale=_scale(cfg),
                image=random_image(gen, sizes["height"], sizes["width"]))


def _dummy_cosmos_safety_checker():
    class DummyCosmosSafetyChecker(ModelMixin, ConfigMixin):
        """Accepts every prompt and video (what diffusers' tests/guidance/cosmos/cosmos_guardrail.py does)."""

        def __init__(self):
            super().__init__()
            self.register_buffer("_device_tracker", torch.zeros(1), persistent=False)

        def check_text_safety(self, prompt: str) -> bool:
            return True

        def check_video_safety(self, frames):
            return frames

    return DummyCosmosSafetyChecker()


@_family("cosmos", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 4, 3, 8, 8), sizes=_wan_sizes,
         call=_cosmos_call, needs_vae=True)
def _cosmos(seed, text, vae):
    # concat_padding_mask=False: its padding-mask path needs torchvision.
    transformer = seeded(seed, lambda: CosmosTransformer3DModel(
        in_channels=5, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=3, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable"))
    return Cosmos2VideoToWorldPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), vae=seeded(seed, _wan_vae),
        transformer=transformer, safety_checker=_dummy_cosmos_safety_checker(), **text)


# ---- EasyAnimate --------------------------------------------------------------------------------------
# Batched [uncond, cond]; masks are required with embeds; the loop reads vae.config.latent_channels.

@_family("easyanimate", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 4, 2, 8, 8),
         sizes=lambda pipe: _video_sizes(2, 8, pipe.vae_temporal_compression_ratio,
                                          pipe.vae_spatial_compression_ratio),
         call=lambda pipe, gen, cfg: dict(_embeds(gen, cfg, 16, mask=True), guidance_scale=_scale(cfg)),
         needs_vae=True)
def _easyanimate(seed, text, vae):
    transformer = seeded(seed, lambda: EasyAnimateTransformer3DModel(
        attention_head_dim=16, num_attention_heads=2, in_channels=4, out_channels=4, mmdit_layers=1, num_layers=3,
        patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8))
    vae_ = seeded(seed, lambda: AutoencoderKLMagvit(
        in_channels=3, out_channels=3,
        down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
        up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        spatial_group_norm=False))
    return EasyAnimatePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae_, transformer=transformer, **text)


# ---- Latte ---------------------------------------------------------------------------------------------
# Frames are `video_length` and must equal the transformer's video_length (3). 2-D image VAE, 2x downsampling.
# negative_prompt defaults to "", which may not come with negative embeds. mask_feature=False: with
# prompt_embeds but no negative embeds (cfg=False), its masking fails (the mask it builds is float, 3-D); with
# both it is skipped anyway.

@_family("latte", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 4, 3, 8, 8),
         sizes=lambda pipe: dict(video_length=3, height=8 * pipe.vae_scale_factor, width=8 * pipe.vae_scale_factor),
         call=lambda pipe, gen, cfg: dict(_embeds(gen, cfg, 8), guidance_scale=_scale(cfg), negative_prompt=None,
                                          mask_feature=False))
def _latte(seed, text, vae):
    transformer = seeded(seed, lambda: LatteTransformer3DModel(
        sample_size=8, num_layers=3, patch_size=2, attention_head_dim=4, num_attention_heads=2, caption_channels=8,
        in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=3))
    vae_ = seeded(seed, lambda: AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2)) if vae else None
    return LattePipeline(scheduler=_ddim(), vae=vae_, transformer=transformer, **text)


# ---- Stable Video Diffusion ----------------------------------------------------------------------------
# Image-to-video UNet. CFG scale is a per-frame ramp linspace(min_guidance_scale, max_guidance_scale); CFG runs
# iff its max > 1 (the uncond branch uses zero image embeddings / latents). The PIL image is resized to 224 for
# the CLIP image encoder, hence image_size=224 (7 x 7 patches of 32).

def _svd_call(pipe, gen, cfg):
    scale = dict(min_guidance_scale=1.0, max_guidance_scale=CFG_SCALE) if cfg else \
        dict(min_guidance_scale=1.0, max_guidance_scale=1.0)
    return dict(scale, image=random_image(gen, 8 * pipe.vae_scale_factor, 8 * pipe.vae_scale_factor), decode_chunk_size=3)


@_family("svd", denoiser_attrs=("unet",), num_layers=16, latent_shape=(1, 3, 4, 8, 8),
         sizes=lambda pipe: dict(num_frames=3, height=8 * pipe.vae_scale_factor, width=8 * pipe.vae_scale_factor),
         call=_svd_call, needs_vae=True)
def _svd(seed, text, vae):
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = seeded(seed, lambda: UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 32, 32, 32), layers_per_block=2,
        cross_attention_dim=32, num_attention_heads=(2, 2, 2, 2), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24, num_frames=3))
    vae_ = seeded(seed, lambda: AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        latent_channels=4))
    image_encoder = seeded(seed, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=1, num_attention_heads=2, image_size=224,
        patch_size=32, intermediate_size=37)))
    # The PIL backend: CLIPImageProcessor falls back to it anyway (with a warning) when torchvision is absent.
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    feature_extractor = processor_cls(crop_size=224, size=224)
    # The released SVD scheduler config (EDM-style Euler, v-prediction, Karras sigmas).
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    return StableVideoDiffusionPipeline(vae=vae_, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=feature_extractor)


# ---- LTX-2 (audio + video) --------------------------------------------------------------------------------
# prompt_embeds are the stacked hidden states of the text encoder's layers (caption_channels x (layers + 1),
# flattened); the text connectors turn them into the video and audio text streams. CFG runs iff guidance_scale
# > 1 or audio_guidance_scale > 1. The pipeline has its own STG and modality guidance, on by default
# (stg_scale=1 on block 28, modality_scale=3): both are turned off here, so that runs are plain CFG and the
# project's STG is the only one. The audio latents come out as `.audio`.

def _ltx2_call(pipe, gen, cfg):
    return dict(_embeds(gen, cfg, 16 * 2, mask=True), guidance_scale=_scale(cfg), audio_guidance_scale=_scale(cfg),
                stg_scale=0.0, audio_stg_scale=0.0, spatio_temporal_guidance_blocks=None, modality_scale=1.0,
                audio_modality_scale=1.0, frame_rate=25.0)


@_family("ltx2", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 4, 2, 8, 8),
         sizes=lambda pipe: _video_sizes(2, 8, pipe.vae_temporal_compression_ratio,
                                          pipe.vae_spatial_compression_ratio),
         call=_ltx2_call, needs_vae=True)
def _ltx2(seed, text, vae):
    transformer = seeded(seed, lambda: LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=3, caption_channels=16,
        rope_double_precision=False))
    # Connector width (heads x head_dim) = caption_channels; text_proj_in_factor = text-encoder layers + 1.
    connectors = seeded(seed, lambda: LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=2, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_double_precision=False))
    # 4x spatial and temporal compression (LTX-2 needs height/width divisible by 32: 32x32 -> 8x8 latents). The
    # pipeline reads vae.config (latents_mean) even for latent output.
    vae_ = seeded(seed, lambda: AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        layers_per_block=(1, 1), decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, True),
        decoder_spatio_temporal_scaling=(True, True), decoder_inject_noise=(False,) * 3,
        downsample_type=("spatial", "spatial"), upsample_residual=(False, False), upsample_factor=(1, 1),
        timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False))
    # Audio VAE (its latent channels x mel bins / 4 = the transformer's audio_in_channels) and vocoder: the
    # diffusers fast-test configs.
    audio_vae = seeded(seed, lambda: AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8))
    vocoder = seeded(seed, lambda: LTX2Vocoder(
        in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000))
    return LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae_, audio_vae=audio_vae,
                        connectors=connectors, transformer=transformer, vocoder=vocoder, **text)


# ---- HunyuanVideo 1.5 ------------------------------------------------------------------------------------
# CFG lives on the pipeline's guider (ClassifierFreeGuidance, scale 4.5), not in __call__'s keywords: so
# call_kwargs(cfg=...) also enables / disables `pipe.guider` (the one pipeline state it touches). Text comes as
# two streams (MLLM embeds + ByT5 glyph embeds, each with a mask); the pipeline adds 729 zero image tokens and
# concatenates [latents, condition latents, mask] as the transformer input (in_channels = 2 * 4 + 1).

def _hunyuan15_call(pipe, gen, cfg):
    (pipe.guider.enable if cfg else pipe.guider.disable)()
    main, glyph = _embeds(gen, cfg, 16, mask=True), _embeds(gen, cfg, 8, n=4, mask=True)
    out = {}
    for sign in ("", "negative_"):
        if f"{sign}prompt_embeds" in main:
            out.update({f"{sign}prompt_embeds": main[f"{sign}prompt_embeds"],
                        f"{sign}prompt_embeds_mask": main[f"{sign}prompt_attention_mask"],
                        f"{sign}prompt_embeds_2": glyph[f"{sign}prompt_embeds"],
                        f"{sign}prompt_embeds_mask_2": glyph[f"{sign}prompt_attention_mask"]})
    return out


@_family("hunyuan_video15", denoiser_attrs=("transformer",), num_layers=3, latent_shape=(1, 4, 3, 8, 8),
         sizes=lambda pipe: _video_sizes(3, 8, pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial),
         call=_hunyuan15_call, needs_vae=True)
def _hunyuan_video15(seed, text, vae):
    transformer = seeded(seed, lambda: HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"))
    # 4x spatial, 2x temporal (the diffusers fast-test VAE). The pipeline reads vae.config even for latents.
    vae_ = seeded(seed, lambda: AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
        upsample_match_channel=False))
    return HunyuanVideo15Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=vae_, transformer=transformer,
        guider=ClassifierFreeGuidance(guidance_scale=CFG_SCALE), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None)


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------

FAMILIES: Tuple[str, ...] = tuple(_FAMILIES)


def tiny_pipeline(family: str, *, seed: int = 0, text_encoder: bool = False, vae: bool = True) -> TinyPipeline:
    """The stock diffusers pipeline of `family`, assembled from tiny random components (weights from `seed`).

    text_encoder: also build a tiny tokenizer + text encoder (families with `prompt=` support, else
        NotImplementedError); without it the text encoder and tokenizer are None and runs use prompt_embeds.
    vae: False leaves the VAE out (latent output only), except where the pipeline needs it even then (image
        encoding or vae.config reads: ltx_i2v, cosmos, easyanimate, svd, ltx2, hunyuan_video15), which keep it.
        Without a VAE, pixel sizes follow the pipeline's default compression ratios; the latents keep their shape.
    """
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    spec = _FAMILIES[family]
    if text_encoder and spec.text is None:
        supported = ", ".join(name for name, s in _FAMILIES.items() if s.text is not None)
        raise NotImplementedError(f"{family}: no tiny text encoder (pass prompt_embeds); text_encoder=True is "
                                  f"supported for: {supported}")
    text = spec.text(seed) if text_encoder else {"tokenizer": None, "text_encoder": None}
    pipe = spec.build(seed, text, vae or spec.needs_vae)
    pipe.set_progress_bar_config(disable=True)
    sizes = spec.sizes(pipe)
    return TinyPipeline(family=family, pipe=pipe, denoiser_attrs=spec.denoiser_attrs, num_layers=spec.num_layers,
                        latent_shape=spec.latent_shape, frames=sizes.get("num_frames", sizes.get("video_length")),
                        size=(sizes["height"], sizes["width"]), _spec=spec)
