"""STG with Restart (the paper's Algorithm 3): re-noise the sample from `t_min` back to `t_max`, re-denoise, K times.

    handle = stg_ext.apply_restart(pipe, t_min=300, t_max=700, K=2)   # then the stock call, unchanged:
    video = pipe(prompt, ...).frames
    handle.remove()                                                  # or: with stg_ext.apply_restart(...):

It composes with `stg_ext.apply_stg(pipe, ...)` (apply both, in either order): the restart passes call the
denoiser exactly like the pipeline's own steps, so STG (with CFG) runs on them too, as Algorithm 3 prescribes.
It is opt-in and does nothing unless applied; `remove()` (or `stg_ext.remove_restart(pipe)`) restores the
scheduler exactly.

The restart segment
-------------------
With the run's N steps at times t_0, ..., t_{N-1} (the values of `pipe.scheduler.timesteps`, i.e. the `t` of the
pipeline's `for i, t in enumerate(timesteps)`), the segment is the steps a..b (m = b - a + 1 of them) whose time
lies in the closed interval [t_min, t_max]. `unit="sigma"` compares the steps' noise levels sigma_i instead
(defined per family below). Algorithm 3 runs the steps 0..b (the last one, at t_b ~ t_min, leaves the sample at
the level after step b), then K times: re-noise that sample to the level at which step a is entered (t_a ~ t_max)
and run the steps a..b again; then it continues with the steps b+1..N-1. The loop the pipeline sees is
`0..b, (a..b) x K, b+1..N-1`: N + K*m iterations. K = 0, or an interval that contains no step, changes nothing
(bit for bit).

Re-noising: the exact forward process of the scheduler's family
----------------------------------------------------------------
From the level "lo" the sample has after step b to the level "hi" at which step a is entered, with eps ~ N(0, I)
(x0 the clean sample; each is the marginal q(x_hi | x_lo) of the family's forward process):

- Flow matching (`FlowMatchEulerDiscreteScheduler`: Wan, LTX-Video, Mochi, HunyuanVideo, Cosmos, ...):
  x_s = (1 - s) x0 + s eps, with s the scheduler's sigma (1 - sigma when `invert_sigmas`); lo = s_{b+1}, hi = s_a:
      x_hi = r x_lo + sqrt(hi^2 - r^2 lo^2) eps,   r = (1 - hi) / (1 - lo).
- Variance exploding / EDM (`EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `EDMEulerScheduler`:
  SVD, Allegro, ...): x_sigma = x0 + sigma eps, lo = sigma_{b+1}, hi = sigma_a:
      x_hi = x_lo + sqrt(hi^2 - lo^2) eps.
- UniPC / DPM-Solver multistep (`UniPCMultistepScheduler`, `DPMSolverMultistepScheduler`: Wan's and SkyReels-V2's
  defaults), flow sigmas or VP: x = alpha x0 + sigma eps from the scheduler's `_sigma_to_alpha_sigma_t`:
      x_hi = r x_lo + sqrt(sigma_hi^2 - r^2 sigma_lo^2) eps,   r = alpha_hi / alpha_lo,
  and each restart pass starts the solver's history afresh (see `_Multistep`).
- Variance preserving / DDPM (`DDIMScheduler`, `CogVideoXDDIMScheduler`, `DDPMScheduler`: CogVideoX, Latte, ...):
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, hi = abar(t_a), lo = the abar the scheduler's step b lands on
  (DDIM: abar(t_b - T // n) or its final_alpha_cumprod; DDPM: abar of its previous timestep, or 1):
      x_hi = sqrt(hi / lo) x_lo + sqrt(1 - hi / lo) eps.
  `unit="sigma"` uses sigma = sqrt((1 - abar) / abar) here (the VE-equivalent level, as Restart sampling does).

The coefficients are computed in float64 from the scheduler's own tables; the re-noising runs in float32 (or the
sample's dtype if wider) and returns the sample's dtype. The steps themselves are the scheduler's own `step`.

Noise: `seed=` gives a CPU `torch.Generator` seeded at every sampling run (each `set_timesteps`); the k-th
restart draws `randn_tensor(latents.shape, generator, dtype=float32)`. Without `seed`, the pipeline's own
`generator` (read from its `__call__` at the first restart of a run; it continues after the pipeline's own
draws) is used, so a seeded pipeline call stays reproducible; with neither, torch's global RNG.

Cost
----
K * m extra denoising steps per run: the run costs (N + K*m) / N times the stock one. Each extra step costs what a
step of the pipeline costs: with CFG 2 forward passes, with STG on top 3 (naive) or about 2 + (L - l)/L (stg_ext's
exact fast path, STG_SPEC section 5), plus one latent-sized `randn` per restart (negligible). Memory is unchanged.

How it works
------------
Only the scheduler is touched, removably: its `set_timesteps`, `step`, `scale_model_input`, `scale_noise` and
`add_noise` are wrapped on the instance (the class is untouched). After `set_timesteps` the scheduler presents the
extended schedule (`timesteps`, `sigmas`, `step_index` indexed by the loop position, so the pipeline's
`for i, t in enumerate(timesteps)`, `len(timesteps)` and `scheduler.sigmas[i]` follow it); inside its own methods
it sees its original schedule with the original step index, so every step is the scheduler's own. The
re-noising is applied to the output of the step that ends a pass. After the last step the scheduler is left
exactly as a stock run leaves it. A deep copy of the scheduler (LTX-2 copies it for its audio latents) restarts
on its own, in step with the original, with `seed + 1`.

Verified (tests/guidance/test_restart.py): K = 0 and empty windows are the stock pipeline bit for bit; the
denoiser runs exactly K*m more steps; final latents equal hand-written Algorithm-3 loops for Wan (flow
matching), SVD (EDM Euler) and CogVideoX (VP DDIM), and for all seven schedulers on a toy denoiser; the
re-noising maps the marginal after step b onto the marginal entering step a; removal restores the scheduler.

Limitations
-----------
- Multistep solvers: UniPC and DPM-Solver multistep (Wan's and SkyReels-V2's default UniPC included) are
  supported, each restart pass starting the solver's history afresh (`_Multistep`); other multistep solvers
  (CogVideoX's CogVideoXDPMScheduler, DEIS, ...) get a TypeError naming the supported classes.
- The pipeline's loop must call `step` once per entry of the timesteps it got from the scheduler, in order
  (every diffusers video pipeline does; a mismatch raises RuntimeError); `per_token_timesteps` is not supported.
- A pipeline's loop index `i` and `pipe._num_timesteps` count the extended loop (N + K*m), and so does what reads
  them: STG's step window (`start`/`stop` fractions) applies to the extended loop, and per-step STG sequences
  must have N + K*m entries (apply_stg rejects N). `loop_step(pipe, i)` maps a loop index back to
  (original step, N), for code that wants a restart pass to use the original step's settings.
- Image/video-to-video pipelines that cut the schedule by `strength` cut the extended schedule (the loop is
  picked up at the scheduler's begin index, or at the first entry of the loop's first timestep): the entries up
  to the segment's end are the original ones, so that is right when the cut falls before the segment.
- A scheduler shared by several pipelines is restarted for all of them; replacing `pipe.scheduler` after
  `apply_restart` leaves the new scheduler stock.
"""
from __future__ import annotations

import copy
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
from diffusers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..handle import Handle
from .loop import pipeline_locals
from .outputs import prediction, with_prediction

logger = logging.getLogger("stg_ext")

__all__ = ["apply_restart", "remove_restart", "restart_plan", "loop_step", "RestartHandle", "RestartPlan",
           "SUPPORTED_SCHEDULERS"]

_ATTR = "_stg_ext_restart"
_WRAPPED = ("set_timesteps", "step", "scale_model_input", "scale_noise", "add_noise")
_UNITS = ("timestep", "sigma")


# --------------------------------------------------------------------------------------------------
# Scheduler families: per-step values and the exact re-noising coefficients
# --------------------------------------------------------------------------------------------------

def _f(x) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


class _Family:
    name: str = ""
    classes: Tuple[str, ...] = ()

    def levels(self, s, n: int) -> List[float]:
        """The noise level sigma of the sample entering each of the n steps (unit="sigma")."""
        raise NotImplementedError

    def coefficients(self, s, a: int, b: int) -> Tuple[float, float]:
        """(scale, std): x_hi = scale * x_lo + std * eps, from the level after step b to the level entering step a."""
        raise NotImplementedError


class _FlowMatching(_Family):
    name = "flow matching"
    classes = ("FlowMatchEulerDiscreteScheduler",)

    @staticmethod
    def _noise(s, i: int) -> float:
        v = _f(s.sigmas[i])
        return 1.0 - v if s.config.get("invert_sigmas", False) else v

    def levels(self, s, n):
        return [self._noise(s, i) for i in range(n)]

    def coefficients(self, s, a, b):
        hi, lo = self._noise(s, a), self._noise(s, b + 1)
        if not lo < 1.0:
            raise ValueError(f"stg_ext.apply_restart: cannot re-noise from the flow-matching level {lo} (pure noise)")
        r = (1.0 - hi) / (1.0 - lo)
        return r, math.sqrt(max(hi * hi - r * r * lo * lo, 0.0))


class _VarianceExploding(_Family):
    name = "variance exploding / EDM"
    classes = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "EDMEulerScheduler")

    def levels(self, s, n):
        return [_f(s.sigmas[i]) for i in range(n)]

    def coefficients(self, s, a, b):
        hi, lo = _f(s.sigmas[a]), _f(s.sigmas[b + 1])
        return 1.0, math.sqrt(max(hi * hi - lo * lo, 0.0))


class _VariancePreserving(_Family):
    name = "variance preserving / DDPM"
    classes = ("DDIMScheduler", "CogVideoXDDIMScheduler", "DDPMScheduler")

    @staticmethod
    def _abar(s, t: int) -> float:
        return _f(s.alphas_cumprod[int(t)])

    @staticmethod
    def _abar_after(s, i: int) -> float:
        """The abar that the scheduler's own step i lands on (mirrors its step)."""
        t = int(_f(s.timesteps[i]))
        if any(c.__name__ == "DDPMScheduler" for c in type(s).__mro__):  # the next timestep, -1 after the last
            prev = int(_f(s.previous_timestep(t)))
            return _f(s.alphas_cumprod[prev]) if prev >= 0 else 1.0
        prev = t - s.config.num_train_timesteps // s.num_inference_steps  # DDIM family
        return _f(s.alphas_cumprod[prev]) if prev >= 0 else _f(s.final_alpha_cumprod)

    def levels(self, s, n):
        out = []
        for i in range(n):
            abar = self._abar(s, _f(s.timesteps[i]))
            out.append(math.sqrt((1.0 - abar) / abar))
        return out

    def coefficients(self, s, a, b):
        hi, lo = self._abar(s, _f(s.timesteps[a])), self._abar_after(s, b)
        ratio = min(hi / lo, 1.0)
        return math.sqrt(ratio), math.sqrt(1.0 - ratio)


class _Multistep(_Family):
    """UniPC and DPM-Solver multistep (flow sigmas or VP): x_t = alpha_t x0 + sigma_t eps, with (alpha_t, sigma_t)
    from the scheduler's own `_sigma_to_alpha_sigma_t` of its `sigmas` (flow: 1 - s, s; VP: sigma = sqrt((1 - abar)
    / abar)); lo = the level after step b, hi = the level entering step a:
        x_hi = r x_lo + sqrt(sigma_hi^2 - r^2 sigma_lo^2) eps,   r = alpha_hi / alpha_lo.
    The solver's history (model outputs, the corrector's last sample, the warm-up order count) belongs to the
    trajectory it was built on: each restart pass starts it afresh, as set_timesteps leaves it (a fresh solve of
    the segment from the re-noised sample, first order at its first step), and the steps after the segment go on
    with the history of the last pass."""

    name = "multistep (UniPC / DPM-Solver)"
    classes = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")
    history = ("model_outputs", "timestep_list", "lower_order_nums", "last_sample", "this_order")

    def levels(self, s, n):
        return [_f(s.sigmas[i]) for i in range(n)]

    def coefficients(self, s, a, b):
        alpha_hi, sigma_hi = (_f(v) for v in s._sigma_to_alpha_sigma_t(s.sigmas[a].double()))
        alpha_lo, sigma_lo = (_f(v) for v in s._sigma_to_alpha_sigma_t(s.sigmas[b + 1].double()))
        r = alpha_hi / alpha_lo
        return r, math.sqrt(max(sigma_hi * sigma_hi - r * r * sigma_lo * sigma_lo, 0.0))


_FAMILIES = (_FlowMatching(), _VarianceExploding(), _VariancePreserving(), _Multistep())


def _history(scheduler) -> Dict[str, Any]:
    """The solver state a restart pass starts from (multistep schedulers; empty for the others)."""
    names = getattr(_family_of(scheduler), "history", ())
    return {name: copy.copy(getattr(scheduler, name)) for name in names if hasattr(scheduler, name)}
SUPPORTED_SCHEDULERS: Tuple[str, ...] = tuple(c for fam in _FAMILIES for c in fam.classes)


def _family_of(scheduler) -> _Family:
    for cls in type(scheduler).__mro__:
        for fam in _FAMILIES:
            if cls.__name__ in fam.classes:
                return fam
    raise TypeError(
        f"stg_ext.apply_restart: {type(scheduler).__name__} is not supported. Restart needs a scheduler whose "
        f"forward process it can re-apply: {', '.join(SUPPORTED_SCHEDULERS)} (flow matching, EDM/VE, DDPM/VP, "
        "UniPC / DPM-Solver multistep); swap the pipeline's scheduler for one of these, e.g. "
        "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).")


# --------------------------------------------------------------------------------------------------
# The plan of one sampling run
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RestartPlan:
    """What one sampling run does: `order[p]` is the original step run at loop position p."""

    steps: int  # N, the run's original number of steps
    first: Optional[int]  # a: the segment's first step (None: no restart in this run)
    last: Optional[int]  # b: the segment's last step
    K: int
    order: Tuple[int, ...]  # 0..b, (a..b) x K, b+1..N-1
    renoise_after: FrozenSet[int]  # loop positions whose step output is re-noised (the end of a pass but the last)
    scale: float = 1.0  # x_hi = scale * x_lo + std * eps
    std: float = 0.0
    family: str = ""

    @property
    def extra_steps(self) -> int:
        """K * m: the denoising steps the restarts add to the run."""
        return len(self.order) - self.steps

    @property
    def active(self) -> bool:
        return self.extra_steps > 0


def _check_args(t_min, t_max, K, unit) -> None:
    for name, value in (("t_min", t_min), ("t_max", t_max)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"stg_ext.apply_restart: {name} must be a finite number, got {value!r}")
    if not t_min < t_max:
        raise ValueError(f"stg_ext.apply_restart: need t_min < t_max (the restart interval [t_min, t_max] goes from "
                         f"the later, less noisy time t_min back to t_max), got t_min={t_min}, t_max={t_max}")
    if isinstance(K, bool) or not isinstance(K, numbers.Integral) or K < 0:
        raise ValueError(f"stg_ext.apply_restart: K (the number of restarts) must be an integer >= 0, got {K!r}")
    if unit not in _UNITS:
        raise ValueError(f"stg_ext.apply_restart: unit must be one of {', '.join(map(repr, _UNITS))}, got {unit!r}")
    if unit == "sigma" and t_min < 0:
        raise ValueError(f"stg_ext.apply_restart: noise levels are >= 0 (unit='sigma'), got t_min={t_min}")


def restart_plan(scheduler, t_min: float, t_max: float, K: int = 1, unit: str = "timestep") -> RestartPlan:
    """The plan for the schedule `scheduler` holds now (after its stock `set_timesteps`)."""
    _check_args(t_min, t_max, K, unit)
    fam = _family_of(scheduler)
    n = len(scheduler.timesteps)
    values = fam.levels(scheduler, n) if unit == "sigma" else [_f(t) for t in scheduler.timesteps]
    inside = [i for i, v in enumerate(values) if t_min <= v <= t_max]
    if K == 0 or not inside:
        return RestartPlan(n, None, None, int(K), tuple(range(n)), frozenset(), family=fam.name)
    a, b = inside[0], inside[-1]
    if inside != list(range(a, b + 1)):
        raise ValueError(f"stg_ext.apply_restart: the steps in [{t_min}, {t_max}] ({inside}) are not contiguous: "
                         "the schedule is not monotone")
    m = b - a + 1
    order = tuple(range(b + 1)) + tuple(range(a, b + 1)) * int(K) + tuple(range(b + 1, n))
    scale, std = fam.coefficients(scheduler, a, b)
    return RestartPlan(n, a, b, int(K), order, frozenset(b + k * m for k in range(int(K))), scale, std, fam.name)


# --------------------------------------------------------------------------------------------------
# One sampling run: the scheduler's two views
# --------------------------------------------------------------------------------------------------

class _Run:
    """The extended schedule of one run. Outside its own methods the scheduler shows the extended view
    (timesteps, sigmas and step_index by loop position); inside them, its original schedule."""

    def __init__(self, scheduler, plan: RestartPlan, generator: Optional[torch.Generator]):
        self.plan = plan
        self.generator = generator
        self.pos = 0
        self.started = False
        n = plan.steps
        self.original: Dict[str, torch.Tensor] = {"timesteps": scheduler.timesteps}
        sigmas = getattr(scheduler, "sigmas", None)
        if isinstance(sigmas, torch.Tensor) and sigmas.dim() == 1 and len(sigmas) == n + 1:
            self.original["sigmas"] = sigmas
        self.extended: Dict[str, torch.Tensor] = {}
        for name, value in self.original.items():
            index = torch.tensor(plan.order, device=value.device)
            self.extended[name] = torch.cat([value[index], value[n:]])
        self.expected = [_f(t) for t in self.extended["timesteps"]]
        self.has_index = hasattr(scheduler, "_step_index")
        self.has_begin = hasattr(scheduler, "_begin_index")
        self.fresh: Dict[str, Any] = {}  # multistep solvers: their state after set_timesteps (_history)

    def _map(self, position: Optional[int]) -> Optional[int]:
        if position is None:
            return None
        order = self.plan.order
        return order[position] if position < len(order) else self.plan.steps

    def show_extended(self, scheduler) -> None:
        for name, value in self.extended.items():
            setattr(scheduler, name, value)

    def show_original(self, scheduler, step_index: Any = "map") -> None:
        """Installs the original schedule; step_index: an original index, or "map" (map the extended one)."""
        ext_index = getattr(scheduler, "_step_index", None)
        ext_begin = getattr(scheduler, "_begin_index", None)
        for name, value in self.original.items():
            setattr(scheduler, name, value)
        if self.has_index:
            scheduler._step_index = self._map(ext_index) if step_index == "map" else step_index
        if self.has_begin:
            scheduler._begin_index = self._map(ext_begin)

    def call_original(self, scheduler, fn: Callable, args, kwargs, step_index: Any = "map"):
        """fn under the original view; the extended view (and its indices) is put back afterwards."""
        ext_index = getattr(scheduler, "_step_index", None)
        ext_begin = getattr(scheduler, "_begin_index", None)
        self.show_original(scheduler, step_index)
        try:
            return fn(*args, **kwargs)
        finally:
            self.show_extended(scheduler)
            if self.has_index:
                scheduler._step_index = ext_index
            if self.has_begin:
                scheduler._begin_index = ext_begin

    def _position(self, timestep) -> Optional[int]:
        """The loop position of `timestep` when it is an entry of the schedule the loop iterates (the `t` of
        `for i, t in enumerate(timesteps)` is a view into it): read from its address, without a device sync."""
        base = self.extended["timesteps"]
        if (isinstance(timestep, torch.Tensor) and timestep.dim() == 0 and timestep.dtype == base.dtype
                and timestep.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()):
            return (timestep.data_ptr() - base.data_ptr()) // base.element_size()
        return None

    def sync(self, scheduler, timestep) -> None:
        """Checks that the loop is at the expected entry. At its first call the loop may start past entry 0 (a
        schedule cut by strength): at the scheduler's begin index if set, else at the timestep's entry. A `t` taken
        from the schedule is placed by its address; any other (a copy, a number) by its value (a device sync)."""
        position = self._position(timestep)
        got = None
        if position is None and timestep is not None:
            got = _f(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if not self.started:
            self.started = True
            begin = getattr(scheduler, "_begin_index", None)
            if begin is not None:
                self.pos = int(begin)
            elif position is not None:
                self.pos = position
            elif got is not None:
                self.pos = next((p for p, want in enumerate(self.expected) if _close(got, want)), 0)
        if self.pos >= len(self.expected):
            raise RuntimeError(f"stg_ext.apply_restart: the pipeline called the scheduler after the last of the "
                               f"{len(self.expected)} steps of the restarted schedule")
        if position is not None and position != self.pos:
            got = self.expected[position]
        if got is not None and not _close(got, self.expected[self.pos]):
            raise RuntimeError(
                f"stg_ext.apply_restart: at loop position {self.pos} the pipeline passed timestep {got}, but the "
                f"restarted schedule has {self.expected[self.pos]} there. Restart needs a loop over the timesteps "
                "the scheduler gave (`for i, t in enumerate(timesteps)`), one step per entry, in order.")


def _close(got: float, want: float) -> bool:
    # loose enough for a timestep passed in bf16, tight against a neighbouring step
    return abs(got - want) <= 1e-2 * max(1.0, abs(want))


# --------------------------------------------------------------------------------------------------
# The handle
# --------------------------------------------------------------------------------------------------

class _Wrapper:
    """A scheduler method as installed on the instance: calls `handle._on_<name>(original, ...)`. A deep copy of the
    scheduler (LTX-2 copies its scheduler for the audio latents) gets wrappers bound to the copy, with their own
    run state (see RestartHandle.__deepcopy__)."""

    def __init__(self, handle: "RestartHandle", name: str, original: Callable):
        self.handle, self.name, self.original = handle, name, original
        self.__wrapped__ = original  # inspect.signature follows it: retrieve_timesteps inspects set_timesteps
        self.__doc__ = getattr(original, "__doc__", None)

    def __call__(self, *args, **kwargs):
        return getattr(self.handle, f"_on_{self.name}")(self.original, *args, **kwargs)

    def __deepcopy__(self, memo):
        if id(self.handle.scheduler) not in memo:  # the wrapper alone is copied: keep it
            return self
        return _Wrapper(copy.deepcopy(self.handle, memo), self.name, copy.deepcopy(self.original, memo))


class RestartHandle(Handle):
    """Restart sampling installed on a scheduler (a pipeline's, or a bare one); `remove()` restores it exactly.
    Also a context manager. `plan` is the plan of the latest sampling run (None before the first)."""

    def __init__(self, target: Any, scheduler, t_min: float, t_max: float, K: int, unit: str, seed: Optional[int],
                 install: bool = True):
        self.pipe = None if target is scheduler else target
        self.scheduler = scheduler
        self.t_min, self.t_max, self.K, self.unit, self.seed = t_min, t_max, int(K), unit, seed
        self.family = _family_of(scheduler).name
        self.plan: Optional[RestartPlan] = None
        self._run: Optional[_Run] = None
        self._saved: Dict[str, Any] = {}
        self._warned_empty = False
        if not install:
            return
        for name in _WRAPPED:
            if not callable(getattr(type(scheduler), name, None)):
                continue
            self._saved[name] = scheduler.__dict__.get(name, _ABSENT)
            setattr(scheduler, name, _Wrapper(self, name, getattr(scheduler, name)))
        setattr(scheduler, _ATTR, self)
        if self.pipe is not None:
            setattr(self.pipe, _ATTR, self)

    def __deepcopy__(self, memo) -> "RestartHandle":
        """The restart of a deep copy of the scheduler: same settings, its own runs, seed + 1 (its re-noising
        draws differ from the original's), the same pipeline (not copied) for the generator."""
        scheduler = memo.get(id(self.scheduler))
        if scheduler is None:  # the handle alone is copied
            return self
        new = RestartHandle(self.pipe, scheduler, self.t_min, self.t_max, self.K, self.unit,
                            None if self.seed is None else self.seed + 1, install=False)
        memo[id(self)] = new
        new.plan = self.plan
        if self._run is not None:  # copied mid-run: the copy continues the same run
            new._run = copy.copy(self._run)
        new._saved = {name: _ABSENT for name in self._saved}
        return new

    # --- the wrapped methods ------------------------------------------------------------------------------------

    def _on_set_timesteps(self, original: Callable, *args, **kwargs):
        self._drop_run()
        out = original(*args, **kwargs)
        plan = restart_plan(self.scheduler, self.t_min, self.t_max, self.K, self.unit)
        self.plan = plan
        if not plan.active:
            if self.K > 0 and not self._warned_empty:
                logger.warning("stg_ext.apply_restart: no step of this run lies in [%s, %s] (unit=%r); sampling runs "
                               "without restart", self.t_min, self.t_max, self.unit)
                self._warned_empty = True
            return out
        generator = torch.Generator("cpu").manual_seed(int(self.seed)) if self.seed is not None else None
        self._run = _Run(self.scheduler, plan, generator)
        self._run.fresh = _history(self.scheduler)
        self._run.show_extended(self.scheduler)
        return out

    def _on_step(self, original: Callable, *args, **kwargs):
        run = self._run
        if run is None:
            return original(*args, **kwargs)
        if kwargs.get("per_token_timesteps") is not None:
            raise NotImplementedError("stg_ext.apply_restart: per_token_timesteps is not supported")
        run.sync(self.scheduler, args[1] if len(args) > 1 else kwargs.get("timestep"))
        pos = run.pos
        out = run.call_original(self.scheduler, original, args, kwargs, step_index=run.plan.order[pos])
        if pos in run.plan.renoise_after:
            out = with_prediction(out, self._renoise(run, prediction(out)))
            for name, value in run.fresh.items():  # a multistep solver starts the restart pass afresh
                setattr(self.scheduler, name, copy.copy(value))
        run.pos = pos + 1
        if run.pos == len(run.plan.order):  # done: leave the scheduler as a stock run leaves it
            run.show_original(self.scheduler, step_index=run.plan.steps)
            self._run = None
        elif run.has_index:
            self.scheduler._step_index = run.pos
        return out

    def _on_scale_model_input(self, original: Callable, *args, **kwargs):
        run = self._run
        if run is None:
            return original(*args, **kwargs)
        run.sync(self.scheduler, args[1] if len(args) > 1 else kwargs.get("timestep"))
        return run.call_original(self.scheduler, original, args, kwargs, step_index=run.plan.order[run.pos])

    def _on_plain(self, original: Callable, *args, **kwargs):
        run = self._run
        if run is None:
            return original(*args, **kwargs)
        return run.call_original(self.scheduler, original, args, kwargs)

    _on_scale_noise = _on_plain
    _on_add_noise = _on_plain

    # --- re-noising ---------------------------------------------------------------------------------------------

    def _generator(self, run: _Run):
        if run.generator is not None or self.pipe is None:
            return run.generator
        loop = pipeline_locals(self.pipe)
        run.generator = loop.get("generator") if loop is not None else None
        return run.generator

    def _renoise(self, run: _Run, sample: torch.Tensor) -> torch.Tensor:
        noise = randn_tensor(tuple(sample.shape), generator=self._generator(run), device=sample.device,
                             dtype=torch.float32)
        work = torch.promote_types(sample.dtype, torch.float32)
        out = sample.to(work) * run.plan.scale + noise.to(work) * run.plan.std
        return out.to(sample.dtype)

    # --- removal ------------------------------------------------------------------------------------------------

    def _drop_run(self) -> None:
        if self._run is not None:
            self._run.show_original(self.scheduler)
            self._run = None

    def remove(self) -> None:
        if getattr(self.scheduler, _ATTR, None) is not self:
            return
        self._drop_run()
        for name, previous in self._saved.items():
            if previous is _ABSENT:
                self.scheduler.__dict__.pop(name, None)
            else:
                setattr(self.scheduler, name, previous)
        self._saved = {}
        delattr(self.scheduler, _ATTR)
        if self.pipe is not None and getattr(self.pipe, _ATTR, None) is self:
            delattr(self.pipe, _ATTR)

    def __repr__(self) -> str:
        return (f"RestartHandle({type(self.scheduler).__name__}, t_min={self.t_min}, t_max={self.t_max}, K={self.K}, "
                f"unit={self.unit!r}, seed={self.seed})")


_ABSENT = object()


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------

def _scheduler_of(target: Any):
    if isinstance(target, SchedulerMixin):
        return target
    scheduler = getattr(target, "scheduler", None)
    if scheduler is None or not isinstance(scheduler, SchedulerMixin):
        raise TypeError(f"stg_ext.apply_restart: {type(target).__name__} is neither a diffusers pipeline with a "
                        "scheduler nor a diffusers scheduler")
    return scheduler


def apply_restart(target: Any, t_min: float, t_max: float, K: int = 1, *, unit: str = "timestep",
                  seed: Optional[int] = None) -> RestartHandle:
    """Restart sampling (Algorithm 3) on a stock pipeline (or a bare scheduler, for custom loops), removably.

    t_min, t_max: the restart interval, in the units of the pipeline's timesteps (`unit="timestep"`: the `t` its
        loop passes to the denoiser, e.g. 0..1000 for flow matching and DDPM, 0.25 ln(sigma) for SVD), or of noise
        levels (`unit="sigma"`: flow-matching sigma in [0, 1], the EDM sigma, or sqrt((1 - abar) / abar)). The
        steps whose value lies in [t_min, t_max] form the segment that is re-noised and re-run.
    K: the number of restarts (>= 0; 0 changes nothing).
    seed: seeds the re-noising (a fresh CPU generator per sampling run); default: the pipeline's `generator`.

    Returns a `RestartHandle` (`.remove()`, context manager, `.plan` of the latest run). Applying again to the
    same pipeline or scheduler replaces the previous restart. Cost: K * m extra steps per run (module docstring).
    """
    _check_args(t_min, t_max, K, unit)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"stg_ext.apply_restart: seed must be an integer or None, got {seed!r}")
    scheduler = _scheduler_of(target)
    _family_of(scheduler)
    remove_restart(target)
    return RestartHandle(target, scheduler, t_min, t_max, K, unit, seed)


def remove_restart(target: Any) -> None:
    """Removes the restart installed on a pipeline's scheduler or on a scheduler (no-op if there is none)."""
    for obj in (target, getattr(target, "scheduler", None)):
        handle = getattr(obj, _ATTR, None) if obj is not None else None
        if isinstance(handle, RestartHandle):
            handle.remove()


def loop_step(target: Any, i: int) -> Optional[Tuple[int, int]]:
    """(original step, N) of loop position i of the restarted run in progress on `target` (a pipeline or
    scheduler), or None when no restarted run is in progress: a restart pass at position i repeats that step."""
    handle = getattr(target, _ATTR, None)
    run = handle._run if isinstance(handle, RestartHandle) else None
    if run is None or not 0 <= i < len(run.plan.order):
        return None
    return run.plan.order[i], run.plan.steps
