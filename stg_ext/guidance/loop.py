"""Where a stock pipeline's denoising loop is, followed through diffusers' own signals.

A sampling run starts when the pipeline calls `scheduler.set_timesteps` and a step ends with each
`scheduler.step` (or, for pipelines that step copies of their scheduler, each update of the pipeline's
progress bar). Both run in the pipeline's loop, outside any compiled denoiser, so the tracker (one per pipeline)
counts them there; a denoiser call then reads the step from the tracker, N from the pipeline's public
`num_timesteps`, and the CFG scale from its public properties (`guidance_scale`, `do_classifier_free_guidance`)
through the pipeline's spec (specs.py).

A few values live only in the pipeline's local variables (HunyuanVideo's `true_cfg_scale`, CogVideoX's
`use_dynamic_cfg`): a spec names them in `run_locals`, and the tracker reads them once per run, at
`set_timesteps`, from the frame of the pipeline method that called it. A missing one is an error naming the
pipeline class, the variable and the diffusers version.

The wrappers go on the scheduler *instance* (its class is untouched) and come off with the tracker; a deep copy of
the scheduler gets the stock methods.
"""
from __future__ import annotations

import copy
import itertools
import sys
import threading
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Dict, List, Optional

import diffusers
from torch import nn

from .threads import check_run_owner

_ABSENT = object()
_RUN_SERIAL = itertools.count(1)
_START_LOCK = threading.Lock()  # a run's start checks and takes the tracker's run at once


def is_pipeline(obj: Any) -> bool:
    """A diffusers pipeline (DiffusionPipeline or a modular one): has `components` and is not a module."""
    return not isinstance(obj, nn.Module) and hasattr(obj, "components")


def _frame_pipeline(frame: FrameType) -> Any:
    """The pipeline whose method this frame runs, or None."""
    code = frame.f_code
    if not code.co_argcount or code.co_varnames[0] != "self":
        return None
    owner = frame.f_locals.get("self")
    return owner if is_pipeline(owner) else None


def pipeline_of(frame: FrameType) -> Any:
    """The pipeline whose method `frame` runs, or None."""
    return _frame_pipeline(frame)


def innermost_pipeline_frame(start: Optional[FrameType] = None) -> Optional[FrameType]:
    """The innermost frame on the stack that runs a method of a pipeline (its `__call__`, or a helper holding
    the loop)."""
    frame = start if start is not None else sys._getframe(1)
    while frame is not None:
        if _frame_pipeline(frame) is not None:
            return frame
        frame = frame.f_back
    return None


def holds(pipe: Any, model: nn.Module) -> bool:
    """True when `model` (or the module it wraps) is one of `pipe`'s components."""
    components = getattr(pipe, "components", None) or {}
    for value in components.values():
        if value is model or getattr(value, "_orig_mod", None) is model:
            return True
    return False


def calling_pipeline(model: nn.Module) -> Any:
    """The pipeline whose method is innermost on the stack, if it holds `model`; else None (the denoiser is called
    outside a pipeline, or by a pipeline that does not hold it)."""
    frame = innermost_pipeline_frame(sys._getframe(1))
    if frame is None:
        return None
    pipe = _frame_pipeline(frame)
    return pipe if holds(pipe, model) else None


def pipeline_locals(pipe: Any) -> Optional[Dict[str, Any]]:
    """The local variables of `pipe`'s innermost method on the stack (None when `pipe` is not the innermost
    pipeline running). Only for code that runs in the pipeline's loop itself (scheduler calls), never inside a
    compiled denoiser."""
    frame = innermost_pipeline_frame(sys._getframe(1))
    if frame is None or _frame_pipeline(frame) is not pipe:
        return None
    return frame.f_locals


def read_run_locals(pipe: Any, names: tuple, frame_locals: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if not names:
        return {}
    missing = [n for n in names if frame_locals is None or n not in frame_locals]
    if missing:
        where = ("no method of the pipeline is on the stack" if frame_locals is None
                 else "the method that called scheduler.set_timesteps has no such local")
        raise RuntimeError(
            f"stg_ext: {type(pipe).__name__} must define the local variable(s) {', '.join(map(repr, missing))} before "
            f"it calls scheduler.set_timesteps (STG reads the CFG setting from there; {where}). This was written for "
            f"diffusers 0.42 and you run diffusers {diffusers.__version__}: please report it; meanwhile use a "
            "custom loop with stg_ext.apply_stg(denoiser, layer, mode, cfg_scale=...).")
    return {n: frame_locals[n] for n in names}


@dataclass
class Run:
    """One sampling run as the tracker saw it start."""

    serial: int                 # orders runs started by different pipelines (the most recent one is current)
    values: Dict[str, Any]      # what the spec read at the run's start (spec.start_run)
    count: int = 0              # steps finished so far: the current step's index
    extra: Dict[str, Any] = field(default_factory=dict)
    thread: Optional[int] = None  # the thread sampling it (threads.py: a second thread at once is an error)


class _MethodWrapper:
    """A scheduler (or progress bar) method as installed on the instance: `on(original, *args, **kwargs)`.
    A deep copy of the instance gets the stock method of the copy (copies run stock)."""

    def __init__(self, on: Callable, original: Callable):
        self.on, self.original, self.active = on, original, True
        self.__wrapped__ = original  # inspect.signature follows it: retrieve_timesteps inspects set_timesteps
        self.__doc__ = getattr(original, "__doc__", None)

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.original(*args, **kwargs)
        return self.on(self.original, *args, **kwargs)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.original, memo)


def _wrap(obj: Any, name: str, on: Callable, saved: Dict):
    saved[(id(obj), name)] = (obj, obj.__dict__.get(name, _ABSENT))
    wrapper = _MethodWrapper(on, getattr(obj, name))
    setattr(obj, name, wrapper)
    return wrapper


_TRACKER_ATTR = "_stg_ext_loop"


def track(pipe: Any, spec: Any) -> "LoopTracker":
    """`pipe`'s tracker, shared by every session that follows `pipe` (each call takes one reference, each
    `release()` gives one back; the last takes the wrappers off)."""
    tracker = pipe.__dict__.get(_TRACKER_ATTR)
    if tracker is None or tracker.scheduler is not getattr(pipe, "scheduler", None):
        tracker = LoopTracker(pipe, spec)
        setattr(pipe, _TRACKER_ATTR, tracker)
    tracker.users += 1
    return tracker


class LoopTracker:
    """Follows `pipe`'s sampling runs (module docstring); `run` is the run in progress (None before the first or
    when the pipeline's scheduler is used outside the pipeline's methods). Made by `track`."""

    def __init__(self, pipe: Any, spec: Any):
        self.pipe, self.spec = pipe, spec
        self.users = 0
        self.run: Optional[Run] = None
        self.listeners: List[Callable[[], None]] = []  # called at each run's start (eagerly, in the loop)
        self.scheduler = getattr(pipe, "scheduler", None)
        self._saved: Dict = {}
        self._wrappers = []
        if self.scheduler is None:
            raise TypeError(f"stg_ext.apply_stg: {type(pipe).__name__} has no scheduler to follow its loop by")
        self._wrappers.append(_wrap(self.scheduler, "set_timesteps", self._on_set_timesteps, self._saved))
        if spec.step_signal == "scheduler":
            self._wrappers.append(_wrap(self.scheduler, "step", self._on_step, self._saved))
        else:
            self._wrappers.append(_wrap(pipe, "progress_bar", self._on_progress_bar, self._saved))

    # --- the signals --------------------------------------------------------------------------------------------

    def _ours(self, frame: Optional[FrameType]) -> bool:
        return frame is not None and _frame_pipeline(frame) is self.pipe

    def _on_set_timesteps(self, original: Callable, *args, **kwargs):
        out = original(*args, **kwargs)
        frame = innermost_pipeline_frame(sys._getframe(1))
        if not self._ours(frame):
            # Called outside our pipeline's methods (a custom loop, or another pipeline sharing the scheduler).
            if frame is None:
                self.run = None
            return out
        self.start_run(frame.f_locals, count=0)
        return out

    def _check_thread(self) -> None:
        run = self.run
        if run is not None:
            check_run_owner(run.thread, self._ours, type(self.pipe).__name__)

    def start_run(self, frame_locals: Optional[Dict[str, Any]], count: int) -> Run:
        with _START_LOCK:
            self._check_thread()
            found = read_run_locals(self.pipe, self.spec.run_locals, frame_locals)
            self.run = Run(next(_RUN_SERIAL), self.spec.start_run(self.pipe, found), count=count,
                           thread=threading.get_ident())
        for listener in list(self.listeners):
            listener()
        return self.run

    def _count(self) -> None:
        run = self.run
        if run is not None and self._ours(innermost_pipeline_frame(sys._getframe(1))):
            self._check_thread()
            run.count += 1

    def _on_step(self, original: Callable, *args, **kwargs):
        out = original(*args, **kwargs)
        self._count()
        return out

    def _on_progress_bar(self, original: Callable, *args, **kwargs):
        bar = original(*args, **kwargs)
        if "update" not in bar.__dict__:
            tracker = self

            def update(original_update, *a, **k):
                out = original_update(*a, **k)
                tracker._count()
                return out

            wrapper = _MethodWrapper(update, bar.update)
            bar.update = wrapper
            self._wrappers.append(wrapper)
        return bar

    # --- removal ------------------------------------------------------------------------------------------------

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self._detach()

    def _detach(self) -> None:
        if self.pipe.__dict__.get(_TRACKER_ATTR) is self:
            del self.pipe.__dict__[_TRACKER_ATTR]
        for (_, name), (obj, previous) in self._saved.items():
            current = obj.__dict__.get(name, _ABSENT)
            if isinstance(current, _MethodWrapper) and current in self._wrappers:
                if previous is _ABSENT:
                    obj.__dict__.pop(name, None)
                else:
                    setattr(obj, name, previous)
        # A wrapper that something else wrapped again (apply_restart after apply_stg) stays, as a pass-through.
        for wrapper in self._wrappers:
            if isinstance(wrapper, _MethodWrapper):  # a deep copy's list holds the copy's stock methods
                wrapper.active = False
        self._saved, self._wrappers, self.run = {}, [], None
