"""STG as a diffusers guider (the `diffusers.guiders` API), for guider-based and modular pipelines.

    from stg_ext.guidance.guider import STGGuidance

    guider = STGGuidance(stg_layer=8, stg_mode="attention", stg_scale=1.0, guidance_scale=5.0)
    modular_pipe.update_components(guider=guider)      # e.g. a Wan modular pipeline
    latents = modular_pipe(...)
    guider.remove_hooks()                             # takes the perturbation hooks off the denoiser(s)

`STGGuidance` is `ClassifierFreeGuidance` plus one more batch per STG mode, `"pred_cond_stg"`: the denoiser runs
on the conditional inputs with stg_ext's perturbation live (STG_SPEC section 3), and `forward` combines with
`stg_ext.combine` (section 2): `f = u + g (c - u) + s (c - p)`, `f = c + s (c - p)` when CFG is off, one term
per mode for factorized guidance, STG's own rescale (Algorithm 4), then the guider's `guidance_rescale` as
diffusers applies it (against `c`).

- The CFG part (`guidance_scale`, `guidance_rescale`, `use_original_formulation`, `start`, `stop`, `enabled`) means
  exactly what it means on `ClassifierFreeGuidance`, and gives the same result bit for bit at any step where STG
  is off. `enabled=False` turns off CFG only (no unconditional batch: what pipelines check before encoding a
  negative prompt); STG is switched by its own options (`stg_scale=0` with `stg_rescale=0`: off, and no perturbed
  batch at all).
- The STG part (`stg_layer`, `stg_mode`, `stg_scale`, `stg_rescale`, `stg_start`, `stg_stop`,
  `stg_orthogonalize`) takes the values of `stg_ext.apply_stg`'s `layer`, `mode`, `scale`, `rescale`, `start`,
  `stop`, `orthogonalize`, per-step sequences included; its window is STG_SPEC section 4's
  (`stg_start * N <= i < stg_stop * N`).
- The perturbation hooks go on a denoiser the first time a perturbed batch runs on it and stay there, inactive
  between perturbed batches; `remove_hooks()` takes them off. The perturbation is live from `prepare_models` to
  `cleanup_models` of a perturbed batch (a call that raises in between leaves it live until the guider's next
  `set_state`, `prepare_models` or `remove_hooks`). One denoiser carries the hooks of one guider at a time.
- The perturbed batch is a full pass of its own (apply_stg's `strategy="naive"`): the pipeline runs the batches,
  so the guider cannot start it from the cond pass's activations; `apply_stg(..., strategy=...)` has no effect on
  guider pipelines.

`apply_stg(pipe, ...)` on a pipeline whose spec has the "guider" convention (HunyuanVideo 1.5) swaps
`pipe.guider` for an `STGGuidance` carrying the pipeline guider's CFG settings (`attach_to_pipeline`); removing
STG puts the original guider back.
"""
from __future__ import annotations

import logging
import math
import threading
import weakref
from contextlib import ExitStack
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg

from ..handle import Handle
from . import caches
from .attached import forget, record, session_of
from .branch import PerturbedBranch
from .config import StepSettings, STGConfig
from .loop import pipeline_of
from .threads import check_run_owner
from ..ops import combine
from ..weak.adapters import get_adapter
from ..weak.model import check_mode, resolve_layers, unwrap

logger = logging.getLogger("stg_ext")

__all__ = ["STGGuidance", "GuiderSession", "attach_to_pipeline"]

STG_PREDICTION = "pred_cond_stg"
_GUIDER_ATTR = "_stg_ext_guider"  # a weak reference to the STGGuidance whose hooks a denoiser carries


def stg_prediction_names(modes: Sequence[str]) -> List[str]:
    """The batch identifiers of the perturbed predictions: "pred_cond_stg", or one "pred_cond_stg_<mode>" per
    mode for factorized guidance."""
    return [STG_PREDICTION] if len(modes) == 1 else [f"{STG_PREDICTION}_{mode}" for mode in modes]


class STGGuidance(BaseGuidance):
    """Classifier-free guidance + Spatiotemporal Skip Guidance (https://arxiv.org/abs/2411.18664).

    Args:
        stg_layer: the perturbed layer(s): an index, a module path, a list of those, or `stg_ext.per_step([...])`.
        stg_mode: "attention" (STG-A), "residual" (STG-R), a factorized mode of the model ("spatial",
            "temporal"), or a tuple of modes (one perturbed batch each).
        stg_scale: the STG scale (a tuple with a tuple of modes; or a per-step sequence).
        stg_rescale: STG's rescale factor in [0, 1] (Algorithm 4; or a per-step sequence).
        stg_start, stg_stop: the STG window, as fractions of the steps.
        stg_orthogonalize: Algorithm 5 (two modes).
        guidance_scale, guidance_rescale, use_original_formulation, start, stop, enabled: as on
            `ClassifierFreeGuidance` (`enabled` and `start`/`stop` concern CFG only).
    """

    _input_predictions = ["pred_cond", "pred_uncond", STG_PREDICTION]

    @register_to_config
    def __init__(
        self,
        stg_layer: Any = None,
        stg_mode: Any = "attention",
        stg_scale: Any = 1.0,
        stg_rescale: Any = 0.0,
        stg_start: float = 0.0,
        stg_stop: float = 1.0,
        stg_orthogonalize: bool = False,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)
        if stg_layer is None:
            raise TypeError("stg_ext.STGGuidance: stg_layer is required (the layer index, module path, list of those, "
                            "or stg_ext.per_step([...]) that STG perturbs)")
        self.stg_layer = stg_layer
        self.stg_mode = tuple(stg_mode) if isinstance(stg_mode, list) else stg_mode
        self.stg_scale = stg_scale
        self.stg_rescale = stg_rescale
        self.stg_start = stg_start
        self.stg_stop = stg_stop
        self.stg_orthogonalize = stg_orthogonalize
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation
        # A bad option fails here, not in the middle of sampling.
        self._input_predictions = ["pred_cond", "pred_uncond", *stg_prediction_names(self._stg_config().modes)]
        # denoiser id -> (denoiser, its perturbed branch, the (modes, layer specs) the branch was built for)
        self._branches: Dict[int, Tuple[torch.nn.Module, PerturbedBranch, Tuple]] = {}
        self._live = None
        # Set by apply_stg (GuiderSession): the pipeline's stock guider, which save_pretrained writes in its place.
        self.stock_guider: Optional[ClassifierFreeGuidance] = None

    def save_pretrained(self, save_directory: Any, push_to_hub: bool = False, **kwargs) -> None:
        """Saves the STG guider; one that apply_stg put on a pipeline saves the pipeline's stock guider instead
        (a pipeline saved with STG on loads without stg_ext)."""
        if self.stock_guider is not None:
            return self.stock_guider.save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    # --- settings -------------------------------------------------------------------------------------------

    def _stg_config(self) -> STGConfig:
        """The STG options as stg_ext checks them (rebuilt when an attribute changed, as diffusers' guiders read
        their attributes at each step)."""
        key = (repr(self.stg_layer), self.stg_mode, repr(self.stg_scale), repr(self.stg_rescale), self.stg_start,
               self.stg_stop, self.stg_orthogonalize)
        cached = getattr(self, "_stg_cached", None)
        if cached is None or cached[0] != key:
            config = STGConfig(self.stg_layer, self.stg_mode, scale=self.stg_scale, rescale=self.stg_rescale,
                               start=self.stg_start, stop=self.stg_stop, orthogonalize=self.stg_orthogonalize)
            cached = (key, config)
            self._stg_cached = cached
        return cached[1]

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        # One sampling run at a time (threads.py): another thread still inside the pipeline's call is an error.
        check_run_owner(getattr(self, "_thread", None), lambda f: getattr(pipeline_of(f), "guider", None) is self,
                        "the pipeline of this STGGuidance")
        self._thread = threading.get_ident()
        super().set_state(step, num_inference_steps, timestep)
        self._close_live()
        if num_inference_steps is not None:
            self._stg_config().check_steps(num_inference_steps)

    def _stg_settings(self) -> Optional[StepSettings]:
        """What STG runs at the current step; None: nothing (outside the window, or all scales 0 and rescale 0)."""
        config = self._stg_config()
        if self._step is None or self._num_inference_steps is None:
            # Before the first set_state (pipelines ask num_conditions then): as at the first step.
            settings = config.at(0, 1)
        else:
            settings = config.at(self._step, self._num_inference_steps)
        if settings is None or settings.is_noop:
            return None
        return settings

    def _is_cfg_enabled(self) -> bool:
        # ClassifierFreeGuidance's own rule, unchanged.
        if not self._enabled:
            return False
        is_within_range = True
        if self._num_inference_steps is not None:
            skip_start_step = int(self._start * self._num_inference_steps)
            skip_stop_step = int(self._stop * self._num_inference_steps)
            is_within_range = skip_start_step <= self._step < skip_stop_step
        if self.use_original_formulation:
            is_close = math.isclose(self.guidance_scale, 0.0)
        else:
            is_close = math.isclose(self.guidance_scale, 1.0)
        return is_within_range and not is_close

    def _is_stg_enabled(self) -> bool:
        return self._stg_settings() is not None

    # --- the batches ----------------------------------------------------------------------------------------

    def _batches(self) -> List[Tuple[str, int]]:
        """(identifier, tuple index of the inputs) of each batch at the current step, in the order they run."""
        out = [("pred_cond", 0)]
        if self._is_cfg_enabled():
            out.append(("pred_uncond", 1))
        if self._is_stg_enabled():
            out += [(name, 0) for name in stg_prediction_names(self._stg_config().modes)]
        return out

    @property
    def num_conditions(self) -> int:
        return len(self._batches())

    @property
    def is_conditional(self) -> bool:
        batches = self._batches()
        k = self._count_prepared - 1
        return 0 <= k < len(batches) and batches[k][0] != "pred_uncond"

    def prepare_inputs(self, data: Dict[str, Any]) -> list:
        return [self._prepare_batch(data, index, name) for name, index in self._batches()]

    def prepare_inputs_from_block_state(self, data: Any, input_fields: Dict[str, Any]) -> list:
        return [self._prepare_batch_from_block_state(input_fields, data, index, name)
                for name, index in self._batches()]

    # --- the perturbed batches ------------------------------------------------------------------------------

    def _branch(self, denoiser: torch.nn.Module, config: STGConfig) -> PerturbedBranch:
        model = unwrap(denoiser)
        want = (config.modes, tuple(repr(spec) for spec in config.all_layers()))
        entry = self._branches.get(id(model))
        if entry is not None and entry[0] is model and entry[2] == want:
            return entry[1]
        if entry is not None:
            entry[1].remove()
            self._release(entry[0])
        owner = getattr(model, _GUIDER_ATTR, None)
        owner = owner() if owner is not None else None
        if owner is not None and owner is not self:
            raise RuntimeError(f"stg_ext.STGGuidance: {type(model).__name__} carries the perturbation hooks of another "
                               "STGGuidance; call that guider's remove_hooks() first")
        if session_of(model) is not None:
            raise RuntimeError(f"stg_ext.STGGuidance: {type(model).__name__} carries STG guidance from apply_stg; "
                               "remove it first with stg_ext.remove_stg")
        # The perturbed batch is a pass of its own, run by the pipeline: no prefix reuse or joined rows.
        branch = PerturbedBranch(model, config.modes, config.all_layers(), strategy="naive")
        self._branches[id(model)] = (model, branch, want)
        setattr(model, _GUIDER_ATTR, weakref.ref(self))
        return branch

    def _release(self, model: torch.nn.Module) -> None:
        owner = getattr(model, _GUIDER_ATTR, None)
        if owner is not None and owner() is self:
            delattr(model, _GUIDER_ATTR)

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        self._close_live()
        batches = self._batches()
        k = self._count_prepared - 1
        if not 0 <= k < len(batches) or not batches[k][0].startswith(STG_PREDICTION):
            return
        config = self._stg_config()
        settings = self._stg_settings()
        names = stg_prediction_names(config.modes)
        mode = config.modes[names.index(batches[k][0])]
        live = ExitStack()
        live.enter_context(self._branch(denoiser, config).live(mode, settings.layer))
        # The perturbed batch runs with diffusers' caches bypassed, as every perturbed pass (caches/__init__.py).
        live.enter_context(caches.bypassed(unwrap(denoiser)))
        self._live = live

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._close_live()

    def _close_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.__exit__(None, None, None)

    def remove_hooks(self) -> None:
        """Takes the perturbation hooks off every denoiser this guider ran on (the guider stays usable: they are
        installed again at its next perturbed batch)."""
        self._close_live()
        for model, branch, _ in self._branches.values():
            branch.remove()
            self._release(model)
        self._branches = {}

    # --- the combination ------------------------------------------------------------------------------------

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None,
                **perturbed: torch.Tensor) -> GuiderOutput:
        cfg = self._is_cfg_enabled()
        settings = self._stg_settings()
        if settings is None:
            # ClassifierFreeGuidance.forward, operation for operation.
            if not cfg:
                pred = pred_cond
            else:
                shift = pred_cond - pred_uncond
                pred = pred_cond if self.use_original_formulation else pred_uncond
                pred = pred + self.guidance_scale * shift
        else:
            config = self._stg_config()
            names = stg_prediction_names(config.modes)
            missing = [name for name in names if perturbed.get(name) is None]
            if missing:
                raise ValueError(f"stg_ext.STGGuidance: STG is on at step {self._step} but the prediction(s) "
                                 f"{', '.join(missing)} were not computed; run every batch of prepare_inputs")
            ps = [perturbed[name] for name in names]
            g = None
            if cfg:
                # The original formulation c + w (c - u) is u + (1 + w)(c - u).
                g = 1.0 + self.guidance_scale if self.use_original_formulation else self.guidance_scale
            scales = settings.scales
            pred = combine(pred_cond, ps[0] if len(ps) == 1 else tuple(ps), pred_uncond if cfg else None,
                           cfg_scale=1.0 if g is None else g, stg_scale=scales[0] if len(scales) == 1 else scales,
                           rescale=settings.rescale, orthogonalize=config.orthogonalize)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    # --- from a CFG guider ----------------------------------------------------------------------------------

    @staticmethod
    def stock_of(guider: "STGGuidance") -> ClassifierFreeGuidance:
        """The ClassifierFreeGuidance with `guider`'s CFG settings (what it computes with STG off)."""
        return ClassifierFreeGuidance(guidance_scale=guider.guidance_scale, guidance_rescale=guider.guidance_rescale,
                                      use_original_formulation=guider.use_original_formulation, start=guider._start,
                                      stop=guider._stop, enabled=guider._enabled)

    @classmethod
    def from_cfg(cls, guider: ClassifierFreeGuidance, config: STGConfig) -> "STGGuidance":
        """An STGGuidance with `guider`'s CFG settings (scale, rescale, formulation, window, enabled) and the STG
        options of `config`."""
        return cls(stg_layer=config.layer, stg_mode=config.mode, stg_scale=config.scale, stg_rescale=config.rescale,
                   stg_start=config.start, stg_stop=config.stop, stg_orthogonalize=config.orthogonalize,
                   guidance_scale=guider.guidance_scale, guidance_rescale=guider.guidance_rescale,
                   use_original_formulation=guider.use_original_formulation, start=guider._start,
                   stop=guider._stop, enabled=guider._enabled)


# --- apply_stg on a guider-based pipeline --------------------------------------------------------------------

STOCK_ENTRY = ("diffusers", "ClassifierFreeGuidance")  # the pipeline config's (model_index.json's) guider entry


def _check_layers(pipe: Any, config: STGConfig) -> None:
    """Resolves every layer and mode on the pipeline's transformer now, not when the first perturbed batch runs."""
    model = getattr(pipe, "transformer", None)
    if model is None:
        return
    model = unwrap(model)
    adapter = get_adapter(model)
    for mode in config.modes:
        check_mode(model, mode)
    for spec in config.all_layers():
        resolve_layers(adapter, model, spec)


class GuiderSession(Handle):
    """STG on a pipeline that combines its predictions with `pipe.guider`: the guider is an `STGGuidance` until
    `remove()`, which puts the original guider back (and the pipeline config's entry for it). A context manager."""

    def __init__(self, pipe: Any, config: STGConfig):
        original = getattr(pipe, "guider", None)
        if isinstance(original, STGGuidance):
            # An STG guider apply_stg did not install here (a pipeline saved or copied with STG on before stock
            # saving, or set by hand): its settings are replaced; the pipeline's guider without STG is the
            # ClassifierFreeGuidance of its CFG settings.
            original.remove_hooks()
            original = STGGuidance.stock_of(original)
        elif type(original) is not ClassifierFreeGuidance:
            raise TypeError(
                f"stg_ext.apply_stg: {type(pipe).__name__} combines its predictions with pipe.guider, which apply_stg "
                f"replaces when it is a ClassifierFreeGuidance; this one is "
                f"{type(original).__name__ if original is not None else None}. Set the guider yourself: "
                "pipe.guider = stg_ext.guidance.guider.STGGuidance(stg_layer=..., stg_mode=..., stg_scale=..., "
                "guidance_scale=...)")
        _check_layers(pipe, config)
        self.owner = pipe
        self.config = config
        self.original = original
        self.guider = STGGuidance.from_cfg(original, config)
        self.guider.stock_guider = original
        self._config_entry = STOCK_ENTRY if hasattr(pipe, "config") else None
        pipe.guider = self.guider  # DiffusionPipeline.__setattr__ also records the component in pipe.config ...
        if self._config_entry is not None:
            pipe.register_to_config(guider=self._config_entry)  # ... where the stock guider stays (model_index.json)

    def remove(self) -> None:
        pipe = self.owner
        if self.guider is not None:
            if getattr(pipe, "guider", None) is self.guider:
                pipe.guider = self.original
                if self._config_entry is not None and pipe.config.get("guider") != self._config_entry:
                    pipe.register_to_config(guider=self._config_entry)
            else:
                logger.warning("stg_ext: %s.guider was replaced while STG was applied; leaving it as it is",
                               type(pipe).__name__)
            self.guider.remove_hooks()
            self.guider = None
        forget(pipe, self)

    def __repr__(self) -> str:
        c = self.config
        return (f"GuiderSession({type(self.owner).__name__}, layer={c.layer!r}, mode={c.mode!r}, scale={c.scale!r}, "
                f"rescale={c.rescale!r}, start={c.start}, stop={c.stop})")


def attach_to_pipeline(pipe: Any, config: STGConfig) -> GuiderSession:
    """`apply_stg(pipe, ...)` for the "guider" convention: swaps in the STG guider and records the session on the
    pipeline (so that `remove_stg(pipe)` and a later `apply_stg` remove it)."""
    session = GuiderSession(pipe, config)
    record(pipe, session)
    return session
