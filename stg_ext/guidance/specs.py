"""What the guidance drivers need to know about one family of stock pipelines, keyed by pipeline class.

A spec answers: which components are the denoisers, how the pipeline calls them (`"batched"`: one call on
the batch `[uncond, cond]`; `"separate"`: a cond call, then an uncond call; `"guider"`: a diffusers guider
combines the predictions, and STG replaces that guider, see `GuiderSpec`), and what CFG scale the pipeline
applies at this call (None when its CFG is off), in the form `f = u + g (c - u)`.
Nothing outside this package knows a pipeline by name.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch

CfgScale = Union[float, torch.Tensor, None]

_SPECS: Dict[str, "PipelineSpec"] = {}


def register_pipeline(spec_cls: Type["PipelineSpec"]) -> Type["PipelineSpec"]:
    instance = spec_cls()
    for name in spec_cls.pipeline_classes:
        _SPECS[name] = instance
    return spec_cls


def supported_pipelines() -> List[str]:
    return sorted(name for name, spec in _SPECS.items() if spec.unsupported is None)


def get_spec(pipe: Any) -> "PipelineSpec":
    for cls in type(pipe).__mro__:
        spec = _SPECS.get(cls.__name__)
        if spec is not None:
            return spec
    raise TypeError(f"stg_ext.apply_stg: {type(pipe).__name__} is not a supported pipeline. Supported: "
                    f"{', '.join(supported_pipelines())}. For a custom loop, apply STG to the denoiser with an "
                    "explicit cfg_scale: stg_ext.apply_stg(pipe.transformer, layer, mode, cfg_scale=...).")


class PipelineSpec:
    pipeline_classes: Tuple[str, ...] = ()
    #: Pipeline attributes holding denoisers (missing or None ones are skipped: Wan 2.1 has no transformer_2).
    denoisers: Tuple[str, ...] = ("transformer",)
    convention: str = "batched"
    #: None, or why apply_stg cannot drive this pipeline and what to use instead.
    unsupported: Optional[str] = None

    def cfg_on(self, pipe: Any, loop: Mapping[str, Any]) -> bool:
        if "do_classifier_free_guidance" in loop:  # a local in Allegro, Latte, CogVideoX
            return bool(loop["do_classifier_free_guidance"])
        return bool(pipe.do_classifier_free_guidance)

    def guidance(self, pipe: Any, loop: Mapping[str, Any], denoiser: str) -> CfgScale:
        return pipe.guidance_scale

    def cfg_scale(self, pipe: Any, loop: Mapping[str, Any], denoiser: str) -> CfgScale:
        """The g of `f = u + g (c - u)` that the pipeline applies after this denoiser call; None: CFG off."""
        return self.guidance(pipe, loop, denoiser) if self.cfg_on(pipe, loop) else None

    def step(self, pipe: Any, loop: Mapping[str, Any]) -> Tuple[int, int]:
        """(i, N): the step of this sampling run and its number of steps. Under `stg_ext.apply_restart` the loop
        repeats a segment; a repeated step keeps its own step's settings (window, per-step values)."""
        from .restart import loop_step

        i = int(loop["i"])
        return loop_step(pipe, i) or (i, int(pipe._num_timesteps))


# --- batched [uncond, cond] --------------------------------------------------------------------------------

@register_pipeline
class MochiLTXSpec(PipelineSpec):
    pipeline_classes = ("MochiPipeline", "LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline",
                        "EasyAnimatePipeline", "EasyAnimateControlPipeline",
                        "EasyAnimateInpaintPipeline", "AllegroPipeline", "LattePipeline")


@register_pipeline
class LTXLongSpec(PipelineSpec):
    # Denoises window after window, each over `scheduler.timesteps[:-1]`: N is that loop's length (its
    # `_num_timesteps` counts one more step than the loop runs).
    pipeline_classes = ("LTXI2VLongMultiPromptPipeline",)

    def step(self, pipe: Any, loop: Mapping[str, Any]) -> Tuple[int, int]:
        return int(loop["i"]), len(pipe.scheduler.timesteps) - 1


@register_pipeline
class CogVideoXSpec(PipelineSpec):
    pipeline_classes = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline",
                        "CogVideoXFunControlPipeline")

    def guidance(self, pipe: Any, loop: Mapping[str, Any], denoiser: str) -> CfgScale:
        if not loop.get("use_dynamic_cfg", False):
            return pipe.guidance_scale
        # Dynamic CFG: the pipeline overwrites its scale *after* this call, from its base scale (a local); the
        # same expression, in the same float operations, gives the value its CFG line will use.
        n, t, base = loop["num_inference_steps"], loop["t"], loop["guidance_scale"]
        return 1 + base * ((1 - math.cos(math.pi * ((n - t.item()) / n) ** 5.0)) / 2)


@register_pipeline
class StableVideoDiffusionSpec(PipelineSpec):
    # guidance_scale is a per-frame tensor (B, F, 1, 1, 1): linspace(min, max) over the frames.
    pipeline_classes = ("StableVideoDiffusionPipeline",)
    denoisers = ("unet",)


# --- separate cond / uncond calls --------------------------------------------------------------------------

@register_pipeline
class WanSpec(PipelineSpec):
    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline", "WanVACEPipeline", "WanVideoToVideoPipeline",
                        "SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline", "SkyReelsV2DiffusionForcingPipeline",
                        "SkyReelsV2DiffusionForcingImageToVideoPipeline",
                        "SkyReelsV2DiffusionForcingVideoToVideoPipeline")
    denoisers = ("transformer", "transformer_2")
    convention = "separate"

    def guidance(self, pipe: Any, loop: Mapping[str, Any], denoiser: str) -> CfgScale:
        # Wan 2.2 uses guidance_scale_2 with its low-noise expert; the loop keeps the one in use in a local.
        for name in ("current_guidance_scale", "guidance_scale"):
            if name in loop:
                return loop[name]
        return pipe.guidance_scale


@register_pipeline
class HunyuanVideoSpec(PipelineSpec):
    # CFG-distilled: `guidance_scale` is an embedded guidance input, not CFG. True CFG runs only when
    # true_cfg_scale > 1 and a negative prompt is given; both live in locals.
    pipeline_classes = ("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline",
                        "HunyuanVideoFramepackPipeline")
    convention = "separate"

    def cfg_on(self, pipe: Any, loop: Mapping[str, Any]) -> bool:
        return bool(loop["do_true_cfg"])

    def guidance(self, pipe: Any, loop: Mapping[str, Any], denoiser: str) -> CfgScale:
        return loop["true_cfg_scale"]


@register_pipeline
class CosmosSpec(PipelineSpec):
    # Cosmos writes CFG as `c + w (c - u)`: that is `u + g (c - u)` with g = 1 + w.
    pipeline_classes = ("CosmosTextToWorldPipeline", "CosmosVideoToWorldPipeline", "Cosmos2TextToImagePipeline",
                        "Cosmos2VideoToWorldPipeline")
    convention = "separate"

    def guidance(self, pipe: Any, loop: Mapping[str, Any], denoiser: str) -> CfgScale:
        return 1.0 + pipe.guidance_scale


# --- not driven ----------------------------------------------------------------------------------------------

@register_pipeline
class LTX2Spec(PipelineSpec):
    pipeline_classes = ("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline",
                        "LTX2InContextPipeline", "LTX2HDRPipeline")
    unsupported = (
        "LTX-2 pipelines run their own STG pass (an extra 'uncond_stg' call combined in x0 space with audio and "
        "modality guidance), which a drop-in patch would duplicate. Use the pipeline's own STG: "
        "pipe(..., stg_scale=1.0, spatio_temporal_guidance_blocks=[i]); stg_ext.perturbed(pipe.transformer, i, mode) "
        "gives the weak model itself.")


# --- a diffusers guider ---------------------------------------------------------------------------------------

@register_pipeline
class GuiderSpec(PipelineSpec):
    # The pipeline combines its predictions with `pipe.guider` (ClassifierFreeGuidance): batches "pred_cond" and
    # "pred_uncond", one denoiser call each, then `pipe.guider(state)`. STG is a guider there: apply_stg swaps in
    # stg_ext.guidance.guider.STGGuidance with the same CFG settings (`attach`), and the session's remove() restores the
    # original guider. No guidance hook goes on the denoiser.
    pipeline_classes = ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline")
    convention = "guider"

    def attach(self, pipe: Any, config: Any) -> Any:
        """Applies STG to `pipe` (the "guider" convention's apply_to_pipeline); returns the session, recorded on
        the pipeline like a guidance session, whose `remove()` undoes it."""
        from .guider import attach_to_pipeline

        return attach_to_pipeline(pipe, config)

    def step(self, pipe: Any, loop: Mapping[str, Any]) -> Tuple[int, int]:
        raise RuntimeError(f"stg_ext: {type(pipe).__name__} is guided through its guider (convention 'guider'): "
                           "apply_to_pipeline must hand it to spec.attach(pipe, config), not to a guidance hook")
