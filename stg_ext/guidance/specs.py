"""What the guidance drivers need to know about one family of stock pipelines, keyed by pipeline class.

A spec answers: which components are the denoisers, how the pipeline calls them (`"cfg_batch"`: one call on
the batch `[uncond, cond]`; `"separate"`: a cond call, then an uncond call; `"guider"`: a diffusers guider
combines the predictions, and STG replaces that guider, see `GuiderSpec`), and what CFG scale the pipeline
applies at this call (None when its CFG is off), in the form `f = u + g (c - u)`.
Nothing outside this package knows a pipeline by name.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch

from .guider import attach_to_pipeline
from .restart import loop_step

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
    """Defaults: the CFG setting from the pipeline's public properties, the step from counted `scheduler.step`
    calls (loop.py), N from `pipe.num_timesteps`."""

    pipeline_classes: Tuple[str, ...] = ()
    #: Pipeline attributes holding denoisers (missing or None ones are skipped: Wan 2.1 has no transformer_2).
    denoisers: Tuple[str, ...] = ("transformer",)
    convention: str = "cfg_batch"
    #: None, or why apply_stg cannot drive this pipeline and what to use instead.
    unsupported: Optional[str] = None
    #: What ends a step: "scheduler" (each `scheduler.step`) or "progress" (each progress-bar update).
    step_signal: str = "scheduler"
    #: Local variables of the pipeline method that calls `set_timesteps`, read once per run (loop.py): only
    #: values that live nowhere else.
    run_locals: Tuple[str, ...] = ()

    def start_run(self, pipe: Any, found: Mapping[str, Any]) -> Dict[str, Any]:
        """What a run needs from its start (called right after `set_timesteps`, outside any compiled code)."""
        return {"cfg_on": self.cfg_on(pipe, found)}

    def cfg_on(self, pipe: Any, found: Mapping[str, Any]) -> bool:
        # Allegro, Latte and CogVideoX decide with a local `guidance_scale > 1.0`, from the same value.
        if hasattr(type(pipe), "do_classifier_free_guidance"):
            return bool(pipe.do_classifier_free_guidance)
        return bool(pipe.guidance_scale > 1.0)

    def guidance(self, pipe: Any, run: Any, denoiser: str, i: int) -> CfgScale:
        return pipe.guidance_scale

    def cfg_scale(self, pipe: Any, run: Any, denoiser: str, i: int) -> CfgScale:
        """The g of `f = u + g (c - u)` that the pipeline applies after this denoiser call at loop position i;
        None: CFG off."""
        return self.guidance(pipe, run, denoiser, i) if run.values["cfg_on"] else None

    def n_steps(self, pipe: Any) -> int:
        return int(pipe.num_timesteps)

    def step(self, pipe: Any, i: int) -> Tuple[int, int]:
        """(step, N) of loop position i. Under `stg_ext.apply_restart` the loop repeats a segment; a repeated step
        keeps its own step's settings (window, per-step values)."""
        return loop_step(pipe, i) or (i, self.n_steps(pipe))


def timestep_table(pipe: Any) -> list:
    """The run's timesteps as Python numbers, read once at its start (no device sync in the steps)."""
    return pipe.scheduler.timesteps.tolist()


def timestep_at(pipe: Any, table: list, i: int):
    """The `t` of loop position i. With apply_restart, a table read before the restart extended the schedule has
    the original N entries: a repeated step has its original step's t."""
    mapped = loop_step(pipe, i)
    if mapped is not None and len(table) == mapped[1]:
        return table[mapped[0]]
    return table[min(i, len(table) - 1)]


# --- [uncond, cond] in one call ---------------------------------------------------------------------------

@register_pipeline
class MochiLTXSpec(PipelineSpec):
    pipeline_classes = ("MochiPipeline", "LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline",
                        "EasyAnimatePipeline", "EasyAnimateControlPipeline",
                        "EasyAnimateInpaintPipeline", "AllegroPipeline", "LattePipeline")


@register_pipeline
class LTXLongSpec(PipelineSpec):
    # Denoises window after window (one set_timesteps each), each over `scheduler.timesteps[:-1]`: N is that
    # loop's length (its `_num_timesteps` counts one more step than the loop runs).
    pipeline_classes = ("LTXI2VLongMultiPromptPipeline",)

    def n_steps(self, pipe: Any) -> int:
        return len(pipe.scheduler.timesteps) - 1


@register_pipeline
class CogVideoXSpec(PipelineSpec):
    pipeline_classes = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline",
                        "CogVideoXFunControlPipeline")
    run_locals = ("use_dynamic_cfg",)

    def start_run(self, pipe: Any, found: Mapping[str, Any]) -> Dict[str, Any]:
        values = super().start_run(pipe, found)
        if found["use_dynamic_cfg"]:
            # Dynamic CFG: the pipeline overwrites its scale after each call, from its base scale and the step's t;
            # the same expression, in the same float operations, gives the value its CFG line uses at each step.
            table = timestep_table(pipe)
            values.update(dynamic=True, base=pipe.guidance_scale, timesteps=table, n=len(table))
        return values

    def guidance(self, pipe: Any, run: Any, denoiser: str, i: int) -> CfgScale:
        v = run.values
        if not v.get("dynamic"):
            return pipe.guidance_scale
        n, t, base = v["n"], timestep_at(pipe, v["timesteps"], i), v["base"]
        return 1 + base * ((1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2)


@register_pipeline
class StableVideoDiffusionSpec(PipelineSpec):
    # guidance_scale is a per-frame tensor (B, F, 1, 1, 1): linspace(min, max) over the frames, set after
    # set_timesteps; whether CFG is on is decided before, from the scalar max_guidance_scale.
    pipeline_classes = ("StableVideoDiffusionPipeline",)
    denoisers = ("unet",)


# --- separate cond / uncond calls --------------------------------------------------------------------------

@register_pipeline
class WanSpec(PipelineSpec):
    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline", "WanVACEPipeline", "WanVideoToVideoPipeline",
                        "SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline")
    denoisers = ("transformer", "transformer_2")
    convention = "separate"

    def start_run(self, pipe: Any, found: Mapping[str, Any]) -> Dict[str, Any]:
        values = super().start_run(pipe, found)
        ratio = getattr(pipe.config, "boundary_ratio", None)
        if ratio is not None:
            # Wan 2.2: the loop runs its high-noise expert at `guidance_scale` while t >= the boundary, then the
            # low-noise one at `guidance_scale_2`; the same comparison, on the same tensor, per step.
            boundary = ratio * pipe.scheduler.config.num_train_timesteps
            values.update(high_noise=(pipe.scheduler.timesteps >= boundary).tolist(),
                          guidance_scale_2=pipe._guidance_scale_2)
        return values

    def guidance(self, pipe: Any, run: Any, denoiser: str, i: int) -> CfgScale:
        high = run.values.get("high_noise")
        if high is None or timestep_at(pipe, high, i):
            return pipe.guidance_scale
        return run.values["guidance_scale_2"]


@register_pipeline
class SkyReelsV2DiffusionForcingSpec(WanSpec):
    # Steps a deep copy of its scheduler per latent frame, several per loop iteration: a step ends with the
    # progress bar's update, once per iteration over its step matrix (N = num_timesteps = its length).
    pipeline_classes = ("SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2DiffusionForcingImageToVideoPipeline",
                        "SkyReelsV2DiffusionForcingVideoToVideoPipeline")
    step_signal = "progress"


@register_pipeline
class HunyuanVideoSpec(PipelineSpec):
    # CFG-distilled: `guidance_scale` is an embedded guidance input, not CFG. True CFG runs only when
    # true_cfg_scale > 1 and a negative prompt is given; both live in locals only.
    pipeline_classes = ("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline",
                        "HunyuanVideoFramepackPipeline")
    convention = "separate"
    run_locals = ("do_true_cfg", "true_cfg_scale")

    def start_run(self, pipe: Any, found: Mapping[str, Any]) -> Dict[str, Any]:
        return {"cfg_on": bool(found["do_true_cfg"]), "true_cfg_scale": found["true_cfg_scale"]}

    def guidance(self, pipe: Any, run: Any, denoiser: str, i: int) -> CfgScale:
        return run.values["true_cfg_scale"]


@register_pipeline
class CosmosSpec(PipelineSpec):
    # Cosmos writes CFG as `c + w (c - u)`: that is `u + g (c - u)` with g = 1 + w.
    pipeline_classes = ("CosmosTextToWorldPipeline", "CosmosVideoToWorldPipeline", "Cosmos2TextToImagePipeline",
                        "Cosmos2VideoToWorldPipeline")
    convention = "separate"

    def guidance(self, pipe: Any, run: Any, denoiser: str, i: int) -> CfgScale:
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
        return attach_to_pipeline(pipe, config)

    def step(self, pipe: Any, i: int) -> Tuple[int, int]:
        raise RuntimeError(f"stg_ext: {type(pipe).__name__} is guided through its guider (convention 'guider'): "
                           "apply_to_pipeline must hand it to spec.attach(pipe, config), not to a guidance hook")
