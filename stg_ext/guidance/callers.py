"""Which pipeline's loop a denoiser call belongs to, and where that loop is.

`apply_stg(pipe, ...)` follows `pipe`; `apply_stg(denoiser, ...)` follows every pipeline that holds the denoiser:
those that hold it when STG is applied (found then), and, in eager mode, any other pipeline found calling it
later. Per pipeline, a `LoopTracker` (loop.py) follows its runs through its scheduler.

At a call in eager mode, the innermost pipeline method on the stack decides whose call it is (a pipeline that
does not hold the denoiser, or another pipeline sharing it, gets a stock call). Inside a compiled denoiser no frame
is read: the call belongs to the pipeline whose run started last.
"""
from __future__ import annotations

import gc
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from . import rescale as pipeline_rescale
from ..weak.model import unwrap
from .attached import record, session_of
from .config import STGConfig
from .loop import LoopTracker, calling_pipeline, holds, is_pipeline, pipeline_locals, track
from .session import CONVENTIONS, GuidanceSession, LoopView
from .specs import PipelineSpec, get_spec


class Binding:
    """One pipeline followed by a session."""

    def __init__(self, session: GuidanceSession, pipe: Any, spec: PipelineSpec, tracker: LoopTracker):
        self.session, self.pipe, self.spec, self.tracker = session, pipe, spec, tracker
        tracker.listeners.append(self.on_run_start)
        self.on_run_start()

    def on_run_start(self) -> None:
        # A denoiser compiled (or wrapped by torch.compile) since STG was applied gets the guidance around its
        # compiled code before its first call of this run.
        models = list(self.session.models.values())
        wrappers = [v for v in self.pipe.components.values()
                    if isinstance(v, nn.Module) and v is not unwrap(v) and any(unwrap(v) is m for m in models)]
        self.session.enter_compiled(wrappers)
        self.session.settle_caches()  # a cache enabled since STG was applied, before its first call of this run

    def view(self, denoiser: str) -> Optional[LoopView]:
        run = self.tracker.run
        if run is None:
            return None
        i = run.count
        step, n_steps = self.spec.step(self.pipe, i)
        return LoopView(step, n_steps, self.spec.cfg_scale(self.pipe, run, denoiser, i), run=run,
                        convention=self.spec.convention)

    def detach(self) -> None:
        if self.on_run_start in self.tracker.listeners:
            self.tracker.listeners.remove(self.on_run_start)
        self.tracker.release()


def _drivable_spec(pipe: Any, how: str) -> PipelineSpec:
    spec = get_spec(pipe)
    if spec.unsupported is not None:
        raise TypeError(f"stg_ext.apply_stg: {type(pipe).__name__}: {spec.unsupported}")
    if spec.convention not in CONVENTIONS:
        raise TypeError(f"stg_ext.apply_stg: {type(pipe).__name__} combines its predictions with its guider; STG "
                        f"replaces that guider, which needs the pipeline: use stg_ext.apply_stg(pipe, ...) ({how})")
    return spec


def _first_count(scheduler: Any) -> int:
    """Steps already taken in a run that was started before a tracker followed it: the scheduler's own
    step index where it keeps one (diffusers' schedulers count from their begin index), else 0."""
    index = getattr(scheduler, "_step_index", None)
    if index is None:
        return 0
    return int(index) - int(getattr(scheduler, "_begin_index", None) or 0)


class PipelineLocator:
    """The session's locator (session.py) for pipelines' loops."""

    def __init__(self, session: GuidanceSession, fixed: Optional[Any] = None):
        self.session = session
        self.discover = fixed is None
        self.bindings: Dict[int, Binding] = {}
        session.on_remove(self.detach)

    def bind(self, pipe: Any, during_call: bool = False) -> Binding:
        spec = _drivable_spec(pipe, "found calling the denoiser" if during_call else "found holding the denoiser")
        tracker = track(pipe, spec)
        binding = Binding(self.session, pipe, spec, tracker)
        self.bindings[id(pipe)] = binding
        if spec.convention == "cfg_batch":
            pipeline_rescale.attach(self.session, pipe)
        if during_call and tracker.run is None:
            # Its run started before the tracker was there: start it from the pipeline's frame and the scheduler.
            tracker.start_run(pipeline_locals(pipe), count=_first_count(tracker.scheduler))
        return binding

    def __call__(self, denoiser: str, model: nn.Module) -> Optional[LoopView]:
        if not torch.compiler.is_compiling():
            pipe = calling_pipeline(model)
            if pipe is None:
                return None
            binding = self.bindings.get(id(pipe))
            if binding is None:
                if not self.discover:
                    return None  # another pipeline that shares the denoiser: it runs stock
                binding = self.bind(pipe, during_call=True)
            return binding.view(denoiser)
        # Traced by torch.compile (a compiled region that stg_ext could not step outside of, e.g. a compiled
        # function calling the denoiser): no frames; the pipeline whose run started last owns the call.
        current = None
        for binding in self.bindings.values():
            run = binding.tracker.run
            if run is not None and (current is None or run.serial > current.tracker.run.serial):
                current = binding
        if current is None:
            if not self.bindings:
                raise RuntimeError(
                    "stg_ext: apply_stg(denoiser) found no pipeline holding the denoiser when it was applied, and a "
                    "compiled region cannot look for its caller: apply STG after building the pipeline, or apply it "
                    "to the pipeline (stg_ext.apply_stg(pipe, ...))")
            return None
        return current.view(denoiser)

    def detach(self) -> None:
        pipeline_rescale.detach(self.session)
        for binding in self.bindings.values():
            binding.detach()
        self.bindings = {}


def pipelines_holding(model: nn.Module) -> List[Any]:
    """The live pipelines that hold `model` as a component (found through the garbage collector's referrers:
    a pipeline keeps its components in its instance dict)."""
    found = []
    for ref in gc.get_referrers(model):
        if not isinstance(ref, dict):
            continue
        for owner in gc.get_referrers(ref):
            if is_pipeline(owner) and getattr(owner, "__dict__", None) is ref and holds(owner, model):
                if all(owner is not p for p in found):
                    found.append(owner)
    return found


def apply_to_pipeline(pipe: Any, config: STGConfig) -> Any:
    spec = get_spec(pipe)
    if spec.unsupported is not None:
        raise TypeError(f"stg_ext.apply_stg: {type(pipe).__name__}: {spec.unsupported}")
    if spec.convention == "guider":
        # The pipeline combines its predictions with a diffusers guider: STG becomes that guider (spec.attach).
        return spec.attach(pipe, config)
    denoisers = {}
    for name in spec.denoisers:
        model = getattr(pipe, name, None)
        # One session per module: a pipeline may hold the same module under two names (Wan 2.2's experts).
        if model is not None and all(model is not other for other in denoisers.values()):
            denoisers[name] = model
    if not denoisers:
        raise TypeError(f"stg_ext.apply_stg: {type(pipe).__name__} has no denoiser loaded ({', '.join(spec.denoisers)})")
    for model in denoisers.values():
        # STG applied to the denoiser itself is replaced (another pipeline's session on it is an error, below).
        earlier = session_of(unwrap(model))
        if earlier is not None and earlier.owner is unwrap(model):
            earlier.remove()
    session = _session(pipe, denoisers, config, fixed=pipe)
    session.locator.bind(pipe)
    record(pipe, session)
    return session


def apply_to_denoiser(model: nn.Module, config: STGConfig) -> GuidanceSession:
    """STG on a denoiser, guided by the loop of whichever pipeline calls it (module docstring)."""
    session = _session(model, {_denoiser_name(model): model}, config, fixed=None)
    for pipe in pipelines_holding(model):
        try:
            session.locator.bind(pipe)
        except TypeError:
            pass  # a pipeline stg_ext cannot drive: the error comes if and when it calls the denoiser
    return session


def _denoiser_name(model: nn.Module) -> str:
    return type(getattr(model, "_orig_mod", model)).__name__


def _session(owner: Any, denoisers: Dict[str, nn.Module], config: STGConfig, fixed: Optional[Any]) -> GuidanceSession:
    holder: Dict[str, PipelineLocator] = {}
    session = GuidanceSession(owner, denoisers, config, lambda name, model: holder["locator"](name, model))
    try:
        session.locator = holder["locator"] = PipelineLocator(session, fixed)
    except Exception:
        session.remove()
        raise
    return session
