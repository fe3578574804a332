"""One-step predictions at step k of a stock pipeline's own loop (the paper's weak-model visualization, A5.6).

What is wanted at step k, from the same noisy latents x_k: the x0 that the cond prediction c alone, the
uncond prediction u alone, the perturbed prediction p alone, CFG, and STG would each give, decoded to video.
Pipelines differ in how a denoiser's output becomes what the scheduler sees (Mochi negates it, Cosmos
preconditions it, LTX packs the latents, SVD guides per frame), so this module does not recompute any of
that: it lets the pipeline itself do it, by steering what its denoiser returns at step k.

- The *record* run samples normally up to step k, saving every denoiser output of steps 0..k-1. At step k
  it runs the denoiser as the pipeline asks, and also the weak model (`stg_ext.perturbed`) on the same
  inputs, and saves u, c, p. Its scheduler input at step k is the pipeline's own CFG prediction.
- Later runs replay the saved outputs for steps 0..k-1 (no model call, and the same x_k bit for bit:
  checked), then at step k either return one saved prediction y in place of every branch (u = c = y, so the
  pipeline's guidance line, whatever its form, gives exactly y), or let stg_ext's guidance run at step k
  only (STG's own prediction).
- At step k the scheduler's input is turned into x0 (x0.py) and returned as the step's result; the
  remaining steps return their input unchanged and skip the denoiser, so the pipeline ends with x0 as its
  final latents and decodes them its own way (unpacking, de-normalising, VAE).
"""
from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

import stg_ext
from ..guidance.outputs import prediction, with_prediction
from .errors import CLIError, UsageError
from .render import STGSettings, stg_applied
from .video import to_uint8_frames
from .x0 import predict_x0




def _fresh(out: Any) -> Any:
    """A copy whose prediction the pipeline may modify without touching the saved one."""
    return with_prediction(out, prediction(out).clone())


def _with_prev_sample(result: Any, new: torch.Tensor) -> Any:
    """A scheduler step's result with its new latents replaced by `new` (tuple or output dataclass)."""
    if isinstance(result, tuple):
        return (new, *result[1:])
    if isinstance(result, torch.Tensor):
        return new
    result.prev_sample = new
    return result


# --- what one run observed at step k ---------------------------------------------------------------------------

@dataclass
class StepCall:
    """One denoiser call at step k (record run)."""

    denoiser: str
    output: Any
    perturbed: Optional[torch.Tensor] = None  # the weak model's prediction on the same inputs


@dataclass
class Capture:
    """What the scheduler got at step k, and the x0 made of it."""

    sample: torch.Tensor  # x_k
    timestep: Any
    model_output: torch.Tensor  # the (guided) prediction, in the scheduler's parametrization
    x0: torch.Tensor


@dataclass
class ProbeResult:
    capture: Capture
    frames: Any  # (T, H, W, 3) uint8: the decoded x0


@dataclass
class _RunState:
    step: int = 0  # index of the current step = scheduler.step calls so far
    replay_index: int = 0
    step_calls: int = 0  # denoiser calls at step k so far
    last: Dict[str, Any] = field(default_factory=dict)  # each denoiser's output at step k
    capture: Optional[Capture] = None


@contextmanager
def _instance_attr(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Sets obj.name for the duration; restores exactly what was there (an instance attribute or none)."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


class StepProbe:
    """Runs a pipeline with its denoisers and scheduler steered at step `step` (see the module doc)."""

    def __init__(self, pipe: Any, denoisers: Dict[str, torch.nn.Module], convention: str, step: int):
        self.pipe = pipe
        self.denoisers = denoisers
        self.convention = convention  # "cfg_batch" ([uncond, cond] in one call) or "separate" (cond, then uncond)
        self.step = step
        self.saved: List[Any] = []  # denoiser outputs of steps < k, in call order
        self.calls: List[StepCall] = []  # the record run's calls at step k
        self.reference: Optional[Capture] = None

    # --- the runs ------------------------------------------------------------------------------------------

    def record(self, kwargs: dict, layer: Any, mode: str) -> ProbeResult:
        """The stock run (CFG), saving what later runs replay, and u, c, p at step k."""

        self.saved, self.calls = [], []

        def at_step(name: str, forward: Callable, args: tuple, kw: dict, index: int) -> Any:
            out = forward(*args, **kw)
            call = StepCall(name, out)
            # The perturbed pass: on every call of a batched pipeline (its cond half is used), on the first
            # (cond) call of a separate-call one.
            if self.convention == "cfg_batch" or index == 0:
                with stg_ext.perturbed(self.denoisers[name], list(layer) if isinstance(layer, tuple) else layer,
                                       mode):
                    call.perturbed = prediction(forward(*args, **kw)).detach()
            self.calls.append(call)
            return out

        result = self._run(kwargs, at_step, replay=False)
        self.reference = result.capture
        return result

    def substitute(self, kwargs: dict, y: torch.Tensor) -> ProbeResult:
        """A replay in which every branch at step k predicts `y`: the scheduler then gets the pipeline's own
        transform of y alone."""
        def at_step(name: str, forward: Callable, args: tuple, kw: dict, index: int) -> Any:
            if index >= len(self.calls):
                raise CLIError("the pipeline called its denoiser more often at the probed step than when recorded")
            out = self.calls[index].output
            reps = prediction(out).shape[0] // y.shape[0]
            return with_prediction(out, torch.cat([y] * reps) if reps > 1 else y.clone())

        return self._run(kwargs, at_step, replay=True)

    def guided(self, kwargs: dict, settings: STGSettings) -> ProbeResult:
        """A replay with stg_ext's guidance active at step k only: STG's own prediction from x_k."""
        n = self._num_steps(kwargs)
        window = STGSettings(layer=settings.layer, mode=settings.mode, scale=settings.scale,
                             rescale=settings.rescale, start=self.step / n, stop=(self.step + 1) / n)

        def at_step(name: str, forward: Callable, args: tuple, kw: dict, index: int) -> Any:
            return forward(*args, **kw)  # the guidance hook sits below this wrapper

        with stg_applied(self.pipe, window):
            return self._run(kwargs, at_step, replay=True)

    # --- the predictions at step k -------------------------------------------------------------------------

    def branches(self) -> Dict[str, Optional[torch.Tensor]]:
        """u, c, p at step k, each for the pipeline's latent batch (u is None when CFG was off)."""
        if not self.calls or self.reference is None:
            raise CLIError("the denoiser was not called at the probed step")
        batch = self.reference.sample.shape[0]
        first = self.calls[0]
        pred = prediction(first.output).detach()
        if self.convention == "cfg_batch":
            if pred.shape[0] == 2 * batch:
                return {"uncond": pred[:batch], "cond": pred[batch:], "perturbed": first.perturbed[batch:]}
            return {"uncond": None, "cond": pred, "perturbed": first.perturbed}
        uncond = prediction(self.calls[1].output).detach() if len(self.calls) > 1 else None
        return {"uncond": uncond, "cond": pred, "perturbed": first.perturbed}

    # --- machinery -----------------------------------------------------------------------------------------

    def _num_steps(self, kwargs: dict) -> int:
        return int(kwargs.get("num_inference_steps") or
                   inspect.signature(type(self.pipe).__call__).parameters["num_inference_steps"].default)

    def _run(self, kwargs: dict, at_step: Callable, replay: bool) -> ProbeResult:
        state = _RunState()
        k = self.step
        scheduler = self.pipe.scheduler
        real_step = scheduler.step
        step_signature = inspect.signature(real_step)

        def wrap(name: str, forward: Callable) -> Callable:
            def steered(*args, **kw):
                if state.step < k:
                    if replay:
                        if state.replay_index >= len(self.saved):
                            raise CLIError("the pipeline called its denoiser more often than when recorded")
                        out = _fresh(self.saved[state.replay_index])
                    else:
                        out = forward(*args, **kw)
                        self.saved.append(_fresh(out))
                    state.replay_index += 1
                    return out
                if state.step == k:
                    out = at_step(name, forward, args, kw, state.step_calls)
                    state.step_calls += 1
                    state.last[name] = out
                    return out
                # After step k the scheduler returns its input unchanged: the prediction is not used.
                last = state.last.get(name)
                return last if last is not None else next(iter(state.last.values()))
            return steered

        def step(*args, **kw):
            bound = step_signature.bind(*args, **kw)
            model_output, timestep, sample = (bound.arguments[n] for n in ("model_output", "timestep", "sample"))
            if state.step == k:
                x0 = predict_x0(scheduler, model_output, timestep, sample)
                state.capture = Capture(sample.detach().clone(), timestep, model_output.detach().clone(), x0)
                result = _with_prev_sample(real_step(*args, **kw), x0.to(sample.dtype))
            elif state.step > k:
                result = _with_prev_sample(real_step(*args, **kw), sample)
            else:
                result = real_step(*args, **kw)
            state.step += 1
            return result

        with ExitStack() as stack:
            for name, module in self.denoisers.items():
                stack.enter_context(_instance_attr(module, "forward", wrap(name, module.forward)))
            stack.enter_context(_instance_attr(scheduler, "step", step))
            out = self.pipe(**kwargs)
        if state.capture is None:
            raise UsageError(f"the pipeline ran {state.step} steps: step {k} was never reached")
        if replay and self.reference is not None and not torch.equal(state.capture.sample, self.reference.sample):
            raise CLIError("the replayed run reached different latents at the probed step than the recorded one "
                           "(the pipeline's loop is not deterministic given its denoiser outputs)")
        frames = out.frames if hasattr(out, "frames") else out[0]
        return ProbeResult(state.capture, to_uint8_frames(frames))
