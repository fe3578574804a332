"""`apply_stg(pipe, ...)`: one guidance session per pipeline, removable.

The session puts a named diffusers hook (`stg_ext.guidance`) on each of the pipeline's denoisers and installs
the perturbed branch's hooks (inactive) on their blocks. At each denoiser call the hook reads the loop state
from the pipeline's `__call__` frame (step, N, CFG scale: `loop.py`), asks the config what this step runs,
and hands the call to the driver of the pipeline's calling convention (`drivers.py`).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Optional

from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import CacheContext, StateManager, _set_cache_context
from torch import nn

from ..weak.adapters import get_adapter
from .branch import PerturbedBranch
from .config import STGConfig
from ..weak.hooks import install, uninstall
from ..weak.model import remove_stg as remove_weak, unwrap
from . import rescale as pipeline_rescale
from .drivers import BatchedDriver, Call, SeparateDriver
from .loop import pipeline_locals
from .specs import get_spec

logger = logging.getLogger("stg_ext")

GUIDANCE_HOOK = "stg_ext.guidance"
_SESSION_ATTR = "_stg_ext_session"


class _ContextProbe(StateManager):
    """Receives the cache context diffusers sets around each denoiser call (`cache_context("cond")`)."""

    def __init__(self) -> None:
        super().__init__(state_cls=None)


class GuidanceHook(ModelHook):
    # Stateful, so that diffusers' cache_context reaches the probe: separate-call pipelines name their calls.
    _is_stateful = True

    def __init__(self, session: "GuidanceSession", denoiser: str):
        super().__init__()
        self.session = session
        self.denoiser = denoiser
        self.context = _ContextProbe()

    def new_forward(self, module: nn.Module, *args, **kwargs) -> Any:
        return self.session.on_call(self, module, args, kwargs)

    def reset_state(self, module: nn.Module) -> nn.Module:
        return module


@dataclass
class LoopView:
    """Where sampling is at one denoiser call."""

    step: int
    n_steps: int
    cfg_scale: Any  # None: CFG off
    run: Any = None  # identifies the sampling run (per-step sequences are checked once per run)


class GuidanceSession:
    """STG on a set of denoisers; `remove()` restores them exactly. Also a context manager.

    `read_loop(denoiser_name)` tells where sampling is at a call (None: not in a denoising loop, pass through);
    `convention` is "batched" or "separate" (see drivers.py)."""

    def __init__(self, owner: Any, denoisers: Dict[str, nn.Module], convention: str, config: STGConfig,
                 read_loop: Callable[[str], Optional[LoopView]]):
        self.owner = owner
        self.convention = convention
        self.config = config
        self.read_loop = read_loop
        self._warned_outside = False
        self._checked_run: Any = None
        self.branches: Dict[str, PerturbedBranch] = {}
        self.drivers: Dict[str, Any] = {}
        self._installed: List = []
        try:
            for name, model in denoisers.items():
                model = unwrap(model)
                if getattr(model, _SESSION_ATTR, None) is not None:
                    raise RuntimeError(f"stg_ext: {name} ({type(model).__name__}) already carries STG guidance (from "
                                       "another pipeline sharing it?); remove that first with stg_ext.remove_stg")
                remove_weak(model)
                self.branches[name] = PerturbedBranch(model, config.modes, config.all_layers(), config.strategy)
                self.drivers[name] = (BatchedDriver(get_adapter(model), model) if convention == "batched"
                                      else SeparateDriver())
                self._installed.append(install(model, GuidanceHook(self, name), GUIDANCE_HOOK))
                setattr(model, _SESSION_ATTR, self)
        except Exception:
            self.remove()
            raise

    # --- per call ---------------------------------------------------------------------------------------------

    def on_call(self, hook: GuidanceHook, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        forward = hook.fn_ref.original_forward
        loop = self.read_loop(hook.denoiser)
        if loop is None:
            if not self._warned_outside:
                logger.warning("stg_ext: %s was called outside a denoising loop STG knows of; STG is not applied "
                               "to such calls", hook.denoiser)
                self._warned_outside = True
            return forward(*args, **kwargs)
        if self._checked_run is not loop.run or loop.run is None:
            self.config.check_steps(loop.n_steps)
            self._checked_run = loop.run
        settings = self.config.at(loop.step, loop.n_steps)
        if settings is not None and settings.is_noop:
            settings = None
        driver = self.drivers[hook.denoiser]
        call = Call(forward, args, kwargs, self.branches[hook.denoiser], settings, self.config.modes,
                    self.config.orthogonalize, loop.cfg_scale)
        context = hook.context._context
        call.isolate = _own_cache_context(module, context)
        if self.convention == "batched":
            return driver(call)
        call.role = driver.role(context.name if context is not None else None, loop.step, loop.cfg_scale is not None)
        return driver(call, loop.step)

    # --- removal ----------------------------------------------------------------------------------------------

    def remove(self) -> None:
        pipeline_rescale.detach(self)
        uninstall(self._installed)
        self._installed = []
        for branch in self.branches.values():
            branch.remove()
            if getattr(branch.model, _SESSION_ATTR, None) is self:
                delattr(branch.model, _SESSION_ATTR)
        self.branches = {}
        if getattr(self.owner, _SESSION_ATTR, None) is self:
            delattr(self.owner, _SESSION_ATTR)

    def __enter__(self) -> "GuidanceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        c = self.config
        return (f"GuidanceSession({type(self.owner).__name__}, layer={c.layer!r}, mode={c.mode!r}, scale={c.scale!r}, "
                f"rescale={c.rescale!r}, start={c.start}, stop={c.stop})")


def _own_cache_context(module: nn.Module, context: Optional[CacheContext]):
    """The perturbed passes get their own cache-context name, so that diffusers' caching hooks keep separate
    state for them; the pipeline's context is set again afterwards."""

    @contextmanager
    def isolate(mode: str) -> Iterator[None]:
        if context is None:
            yield
            return
        _set_cache_context(module, replace(context, name=f"{context.name}:stg_{mode}"))
        try:
            yield
        finally:
            _set_cache_context(module, context)

    return isolate


def apply_to_pipeline(pipe: Any, config: STGConfig) -> GuidanceSession:
    spec = get_spec(pipe)
    if spec.unsupported is not None:
        raise TypeError(f"stg_ext.apply_stg: {type(pipe).__name__}: {spec.unsupported}")
    remove_from_pipeline(pipe)
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

    def read_loop(denoiser: str) -> Optional[LoopView]:
        loop = pipeline_locals(pipe)
        if loop is None or "i" not in loop:
            return None
        step, n_steps = spec.step(pipe, loop)
        return LoopView(step, n_steps, spec.cfg_scale(pipe, loop, denoiser), run=loop.get("timesteps"))

    session = GuidanceSession(pipe, denoisers, spec.convention, config, read_loop)
    session.spec = spec
    try:
        pipeline_rescale.attach(session)
    except Exception:
        session.remove()
        raise
    setattr(pipe, _SESSION_ATTR, session)
    return session


def remove_from_pipeline(pipe: Any) -> None:
    session = getattr(pipe, _SESSION_ATTR, None)
    if session is not None:
        session.remove()


def is_pipeline(target: Any) -> bool:
    return not isinstance(target, nn.Module) and hasattr(target, "components")


def remove_from_model(model: nn.Module) -> None:
    """Removes the guidance session that has hooks on `model` (a pipeline's or a bare denoiser's)."""
    session = getattr(unwrap(model), _SESSION_ATTR, None)
    if session is not None:
        session.remove()
