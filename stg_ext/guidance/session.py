"""A guidance session: STG on a set of denoisers, removable.

The session puts a named diffusers hook (`stg_ext.guidance`) on each denoiser and installs the perturbed
branch's hooks (inactive) on their blocks. At each denoiser call the hook asks the session's *locator* where
sampling is (step, N, CFG scale, the calling convention: `LoopView`), asks the config what this step runs, and
hands the call to the driver of that convention (`drivers.py`). Locators: `callers.PipelineLocator` (the loop
of the pipeline that calls the denoiser, followed through diffusers' signals) and `manual.ManualLoop` (a custom
loop that sets the step itself).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import CacheContext, StateManager, _set_cache_context
from torch import nn

from ..handle import Handle
from ..weak.adapters import get_adapter
from ..weak.hooks import install, uninstall
from ..weak.model import remove_weak_model, unwrap
from .attached import forget, record, session_of
from .branch import PerturbedBranch
from .config import STGConfig
from .drivers import CFGBatchDriver, Call, SeparateDriver

logger = logging.getLogger("stg_ext")

GUIDANCE_HOOK = "stg_ext.guidance"
#: How a pipeline calls its denoiser: "cfg_batch" (one call on [uncond, cond], or [cond] with CFG off) or
#: "separate" (a cond call, then an uncond call). Guider pipelines ("guider") get no guidance hook.
CONVENTIONS = ("cfg_batch", "separate")


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
    convention: str = "cfg_batch"


Locator = Callable[[str, nn.Module], Optional[LoopView]]


class GuidanceSession(Handle):
    """STG on `denoisers` (name -> module); `locate(name, module)` tells where sampling is at a call (None: not in
    a denoising loop: the call runs stock). `remove()` restores the denoisers exactly; also a context manager."""

    def __init__(self, owner: Any, denoisers: Dict[str, nn.Module], config: STGConfig, locate: Locator):
        self.owner = owner
        self.config = config
        self.locate = locate
        self._warned_outside = False
        self._checked_run: Any = None
        self.models: Dict[str, nn.Module] = {}
        self.branches: Dict[str, PerturbedBranch] = {}
        self.drivers: Dict[Tuple[str, str], Any] = {}
        self._installed: List = []
        self._on_remove: List[Callable[[], None]] = []
        try:
            for name, model in denoisers.items():
                model = unwrap(model)
                if session_of(model) is not None:
                    raise RuntimeError(f"stg_ext: {name} ({type(model).__name__}) already carries STG guidance (from "
                                       "another pipeline sharing it?); remove that first with stg_ext.remove_stg")
                remove_weak_model(model)
                self.models[name] = model
                self.branches[name] = PerturbedBranch(model, config.modes, config.all_layers(), config.strategy)
                self._installed.append(install(model, GuidanceHook(self, name), GUIDANCE_HOOK))
                record(model, self)
        except Exception:
            self.remove()
            raise

    def driver(self, denoiser: str, convention: str) -> Any:
        key = (denoiser, convention)
        if key not in self.drivers:
            model = self.models[denoiser]
            self.drivers[key] = (CFGBatchDriver(get_adapter(model), model) if convention == "cfg_batch"
                                 else SeparateDriver())
        return self.drivers[key]

    def on_remove(self, fn: Callable[[], None]) -> None:
        """Runs `fn` when the session is removed (locators detach their trackers)."""
        self._on_remove.append(fn)

    # --- per call ---------------------------------------------------------------------------------------------

    def on_call(self, hook: GuidanceHook, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        forward = hook.fn_ref.original_forward
        loop = self.locate(hook.denoiser, module)
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
        driver = self.driver(hook.denoiser, loop.convention)
        call = Call(forward, args, kwargs, self.branches[hook.denoiser], settings, self.config.modes,
                    self.config.orthogonalize, loop.cfg_scale)
        context = hook.context._context
        call.isolate = _own_cache_context(module, context)
        if loop.convention == "cfg_batch":
            return driver(call)
        call.role = driver.role(context.name if context is not None else None, loop.step, loop.cfg_scale is not None)
        return driver(call, loop.step)

    # --- removal ----------------------------------------------------------------------------------------------

    def remove(self) -> None:
        for fn in self._on_remove:
            fn()
        self._on_remove = []
        uninstall(self._installed)
        self._installed = []
        for branch in self.branches.values():
            branch.remove()
            forget(branch.model, self)
        self.branches = {}
        forget(self.owner, self)

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


def remove_session(target: Any) -> None:
    """Removes the guidance session recorded on a pipeline or a denoiser (no-op when there is none)."""
    session = session_of(unwrap(target) if isinstance(target, nn.Module) else target)
    if session is not None:
        session.remove()
