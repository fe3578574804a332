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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import CacheContext, StateManager, _set_cache_context
from torch import nn

from ..handle import Handle
from ..weak.adapters import get_adapter
from ..weak.hooks import install, uninstall
from ..weak.model import remove_weak_model, unwrap
from . import caches
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
        # True once the guidance runs around the compiled model (CompiledEntry): then each pass through here is
        # one of the guidance's own calls of the compiled model, and only the stock forward runs here.
        self.passthrough = False

    def new_forward(self, module: nn.Module, *args, **kwargs) -> Any:
        if self.passthrough:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.session.on_call(self, module, args, kwargs, self.fn_ref.original_forward)

    def reset_state(self, module: nn.Module) -> nn.Module:
        return module


class CompiledEntry:
    """The guidance around a compiled denoiser, installed where the compiled code is entered (`model.compile()`'s
    `_compiled_call_impl`, or a `torch.compile(model)` wrapper's `forward`). The loop state, the choice of passes and
    the combination run here, eagerly; each pass is one call of the compiled model, whose guidance hook then only
    runs the stock forward. So nothing of the guidance is traced: no graph breaks, and no per-step value in the
    compiled graphs' guards."""

    def __init__(self, session: "GuidanceSession", hook: GuidanceHook, owner: Any, attr: str):
        self.session, self.hook, self.owner, self.attr = session, hook, owner, attr
        self.compiled = owner.__dict__[attr]

    def __call__(self, *args, **kwargs) -> Any:
        return self.session.on_call(self.hook, self.session.models[self.hook.denoiser], args, kwargs, self.compiled)

    def remove(self) -> None:
        if self.owner.__dict__.get(self.attr) is self:
            object.__setattr__(self.owner, self.attr, self.compiled)


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
        self.hooks: Dict[str, GuidanceHook] = {}
        self.wrappers: List[nn.Module] = []  # torch.compile wrappers (OptimizedModule) of the denoisers
        self.entries: List[CompiledEntry] = []
        try:
            for name, model in denoisers.items():
                if model is not unwrap(model):
                    self.wrappers.append(model)
                model = unwrap(model)
                if session_of(model) is not None:
                    raise RuntimeError(f"stg_ext: {name} ({type(model).__name__}) already carries STG guidance (from "
                                       "another pipeline sharing it?); remove that first with stg_ext.remove_stg")
                remove_weak_model(model)
                self.models[name] = model
                self.branches[name] = PerturbedBranch(model, config.modes, config.all_layers(), config.strategy)
                self.hooks[name] = GuidanceHook(self, name)
                self._installed.append(install(model, self.hooks[name], GUIDANCE_HOOK))
                record(model, self)
            self.settle_caches()
            self.enter_compiled()
        except Exception:
            self.remove()
            raise

    def enter_compiled(self, wrappers: Sequence[nn.Module] = ()) -> None:
        """Moves the guidance around each denoiser's compiled code, wherever it has some now (called when STG is
        applied and when a sampling run starts, so a model compiled after apply_stg is found before its first
        call). `wrappers`: torch.compile wrappers of the denoisers seen elsewhere (a pipeline's components)."""
        for wrapper in wrappers:
            if all(wrapper is not w for w in self.wrappers):
                self.wrappers.append(wrapper)
        for name, model in self.models.items():
            places = [(model, "_compiled_call_impl")] if model.__dict__.get("_compiled_call_impl") is not None else []
            places += [(w, "forward") for w in self.wrappers if unwrap(w) is model and "forward" in w.__dict__]
            for owner, attr in places:
                if not isinstance(owner.__dict__[attr], CompiledEntry):
                    self.entries.append(CompiledEntry(self, self.hooks[name], owner, attr))
                    object.__setattr__(owner, attr, self.entries[-1])
                    self.hooks[name].passthrough = True

    def reconfigure(self, config: STGConfig, cfg_scale: Any = None) -> bool:
        """Takes `config` in place of the current one when the installed hooks serve it (same structure);
        False otherwise (the caller then installs a new session)."""
        if config.structure != self.config.structure:
            return False
        self._refuse_caches(config)
        self.config, self._checked_run = config, None
        return True

    def _refuse_caches(self, config: STGConfig) -> None:
        spread = getattr(self, "branch_group", None) is not None  # process_group= (parallel.attach)
        for name, model in self.models.items():  # the calls until the next check use these scans
            self.branches[name].cache_scan = caches.CacheScan(model)
        for name, model in self.models.items():
            reasons = caches.refusals(model, config, spread, self.branches[name].cache_scan)
            if reasons:
                raise ValueError("; ".join(reasons))

    def settle_caches(self) -> None:
        """Whatever diffusers caches the denoisers carry now (enabled before or after STG): refuses the combinations
        without meaning and moves the guidance hook outside the caches' denoiser-level hooks. Called when STG is
        applied, when a run starts (before the denoiser's first call) and at each run's first call."""
        self._refuse_caches(self.config)
        for model in self.models.values():
            caches.arrange(model, GUIDANCE_HOOK)

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

    def on_call(self, hook: GuidanceHook, module: nn.Module, args: tuple, kwargs: dict, forward: Callable) -> Any:
        """One denoiser call: `forward` runs the stock model (its forward below the guidance hook, or its compiled
        code)."""
        loop = self.locate(hook.denoiser, module)
        if loop is None:
            if not self._warned_outside:
                logger.warning("stg_ext: %s was called outside a denoising loop STG knows of; STG is not applied "
                               "to such calls", hook.denoiser)
                self._warned_outside = True
            return forward(*args, **kwargs)
        rearrange = False
        if self._checked_run is not loop.run or loop.run is None:
            self.config.check_steps(loop.n_steps)
            self._refuse_caches(self.config)
            # A cache hook installed outside the guidance hook since the run started (a custom loop that did not call
            # set_step(0, n), a pipeline first seen calling mid-run): this call is already inside it; the hook moves
            # out once the call returns, and the driver takes the batch it gets (the cond half, from FasterCache).
            rearrange = bool(caches.outside(module, GUIDANCE_HOOK)) and not hook.passthrough
            self._checked_run = loop.run
        settings = self.config.at(loop.step, loop.n_steps)
        if settings is not None and settings.is_noop:
            settings = None
        driver = self.driver(hook.denoiser, loop.convention)
        call = Call(forward, args, kwargs, self.branches[hook.denoiser], settings, self.config.modes,
                    self.config.orthogonalize, loop.cfg_scale, idle_layer=self.config.idle_layer(loop.step, loop.n_steps),
                    placement=self.config.placement, run=loop.run)
        context = hook.context._context
        call.isolate = _own_cache_context(module, call.branch.cache_scan, context)
        try:
            if loop.convention == "cfg_batch":
                return driver(call)
            call.role = driver.role(context.name if context is not None else None, loop.step,
                                    loop.cfg_scale is not None)
            return driver(call, loop.step)
        finally:
            if rearrange:
                caches.arrange(module, GUIDANCE_HOOK)

    # --- removal ----------------------------------------------------------------------------------------------

    def remove(self) -> None:
        for fn in self._on_remove:
            fn()
        self._on_remove = []
        for entry in self.entries:
            entry.remove()
        self.entries = []
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


def _own_cache_context(module: nn.Module, scan: caches.CacheScan, context: Optional[CacheContext]):
    """The perturbed passes run with diffusers' cache hooks bypassed (caches/__init__.py: p is the uncached weak
    model's) and under a cache-context name of their own, so that any other stateful hook keeps separate state for
    them; the pipeline's context is set again afterwards."""

    @contextmanager
    def isolate(mode: str) -> Iterator[None]:
        with scan.bypassed():
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
