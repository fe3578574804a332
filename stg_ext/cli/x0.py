"""The one-step prediction x0 of the clean latents from what a scheduler's `step` receives.

`predict_x0(scheduler, model_output, timestep, sample)` is called where the pipeline calls
`scheduler.step(model_output, timestep, sample)`, before that call (the scheduler's step index then points
at the current step). `model_output` is the prediction in the scheduler's parametrization:

- flow matching (FlowMatch* schedulers, UniPC with flow sigmas): x0 = x_t - sigma_t * v;
- k-diffusion sigma schedulers (Euler, Heun, LMS, KDPM2; SVD): epsilon: x0 = x_t - sigma * eps;
  v-prediction: x0 = v * (-sigma / sqrt(sigma^2 + 1)) + x_t / (sigma^2 + 1); "sample": x0 = output;
- multistep solvers that predict x0 internally (UniPC, DPM-Solver++, DEIS): their own convert_model_output;
- alpha-bar schedulers (DDIM, DDPM, CogVideoX's DDIM / DPM, LCM, TCD): with a = alphas_cumprod[t]:
  epsilon: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a); v: x0 = sqrt(a) x_t - sqrt(1 - a) v; "sample": output;
- anything else: the `pred_original_sample` of the step of a copy of the scheduler, when it reports one.
Where the scheduler clips its x0 (`clip_sample`), so does this.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from .errors import CLIError

SIGMA_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler")
X0_SOLVER_ALGORITHMS = (None, "dpmsolver++", "sde-dpmsolver++")


def _current_index(scheduler: Any, timestep: Any) -> int:
    """The step index the scheduler's step is about to use (it initialises it on its first step)."""
    index = getattr(scheduler, "step_index", None)
    if index is None:
        scheduler._init_step_index(timestep)  # what step() does first; it would do the same right after
        index = scheduler.step_index
    return int(index)


def _sigma(scheduler: Any, timestep: Any) -> torch.Tensor:
    return scheduler.sigmas[_current_index(scheduler, timestep)]


def _prediction_type(scheduler: Any) -> str:
    return getattr(scheduler.config, "prediction_type", None) or "epsilon"


def _is_flow(scheduler: Any) -> bool:
    cfg = scheduler.config
    return ("FlowMatch" in type(scheduler).__name__ or getattr(cfg, "prediction_type", None) == "flow_prediction"
            or bool(getattr(cfg, "use_flow_sigmas", False)))


def predict_x0(scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> torch.Tensor:
    x0 = _predict_x0(scheduler, model_output, timestep, sample)
    # Schedulers configured to clip their x0 (DDIM's and DDPM's default clip_sample) step from the clipped one.
    if getattr(scheduler.config, "clip_sample", False):
        bound = float(getattr(scheduler.config, "clip_sample_range", 1.0))
        x0 = x0.clamp(-bound, bound)
    return x0


def _predict_x0(scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> torch.Tensor:
    out = model_output.float()
    x = sample.float()
    name = type(scheduler).__name__
    kind = _prediction_type(scheduler)
    if _is_flow(scheduler) and hasattr(scheduler, "sigmas"):
        sigma = _sigma(scheduler, timestep).to(x.device, torch.float32)
        return x - sigma * out
    if name in SIGMA_SCHEDULERS:
        sigma = _sigma(scheduler, timestep).to(x.device, torch.float32)
        if kind == "epsilon":
            return x - sigma * out
        if kind == "v_prediction":
            return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
        if kind == "sample":
            return out
    if hasattr(scheduler, "convert_model_output") and getattr(scheduler, "predict_x0", True) and \
            getattr(scheduler.config, "algorithm_type", None) in X0_SOLVER_ALGORITHMS:
        _current_index(scheduler, timestep)
        return scheduler.convert_model_output(model_output, sample=sample).float()
    if hasattr(scheduler, "alphas_cumprod") and not hasattr(scheduler, "sigmas"):
        t = int(timestep.flatten()[0].item()) if isinstance(timestep, torch.Tensor) else int(timestep)
        a = scheduler.alphas_cumprod[t].to(x.device, torch.float32)
        if kind == "epsilon":
            return (x - (1 - a) ** 0.5 * out) / a ** 0.5
        if kind == "v_prediction":
            return a ** 0.5 * x - (1 - a) ** 0.5 * out
        if kind == "sample":
            return out
    try:
        result = copy.deepcopy(scheduler).step(model_output, timestep, sample, return_dict=True)
    except Exception as e:
        raise CLIError(f"cannot compute x0 for {name} (prediction type {kind!r}): {e}") from e
    x0 = getattr(result, "pred_original_sample", None)
    if x0 is None:
        raise CLIError(f"cannot compute x0 for {name} (prediction type {kind!r}): no formula known and its step "
                       "reports no pred_original_sample")
    return x0.float()
