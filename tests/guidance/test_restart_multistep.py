"""Restart on the multistep solvers the pipelines ship with (issue 15): UniPC (Wan's and SkyReels-V2's default) and
DPM-Solver multistep, flow sigmas and VP.

Definition (stg_ext/guidance/restart.py, `_Multistep`): the loop is Algorithm 3's `0..b, (a..b) x K, b+1..N-1`;
the re-noising is the forward process x = alpha x0 + sigma eps between the level after step b and the level
entering step a; each restart pass runs the segment with the solver's history started afresh (a scheduler just
after `set_timesteps`), the steps after the segment continue with the last pass's solver. The references below
write that out with a new scheduler per restart pass.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List

import pytest
import torch
import diffusers

from stg_ext.guidance.restart import apply_restart, restart_plan
from stg_ext.testing.tiny import tiny_pipeline

from .test_restart import _check, _noises, _segment

SCHEDULERS: Dict[str, Callable[[], object]] = {
    "unipc-flow": lambda: diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                            flow_shift=3.0),
    "unipc-vp": lambda: diffusers.UniPCMultistepScheduler(),
    "dpm-flow": lambda: diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                              flow_shift=3.0),
    "dpm-vp": lambda: diffusers.DPMSolverMultistepScheduler(),
}


def _signal_noise(scheduler, sigma: float):
    """(alpha, sigma) of x = alpha x0 + sigma eps, written from each parameterization's definition."""
    if scheduler.config.use_flow_sigmas:
        return 1.0 - sigma, sigma
    alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)  # VP: sigma = sqrt((1 - abar) / abar)
    return alpha, sigma * alpha


def _renoise(scheduler):
    def renoise(a, b, x, eps):
        s_hi, n_hi = _signal_noise(scheduler, float(scheduler.sigmas[a]))
        s_lo, n_lo = _signal_noise(scheduler, float(scheduler.sigmas[b + 1]))
        r = s_hi / s_lo
        return (x * r + eps * math.sqrt(n_hi ** 2 - (r * n_lo) ** 2)).to(x.dtype)
    return renoise


def _fresh(make, n):
    scheduler = make()
    scheduler.set_timesteps(n)
    return scheduler


def _reference_loop(make, n, lo, hi, K, x, model_output, noises: List[torch.Tensor]):
    """Algorithm 3 with a new solver for every restart pass; `model_output(x, t)` is the denoiser's prediction."""
    scheduler = _fresh(make, n)
    renoise = _renoise(scheduler)
    a, b = _segment(scheduler.timesteps, lo, hi)

    def step(solver, i, x):
        solver._step_index = i
        return solver.step(model_output(x, solver.timesteps[i]), solver.timesteps[i], x, return_dict=False)[0]

    for i in range(b + 1):
        x = step(scheduler, i, x)
    for k in range(K):
        x = renoise(a, b, x, noises[k])
        scheduler = _fresh(make, n)
        for i in range(a, b + 1):
            x = step(scheduler, i, x)
    for i in range(b + 1, n):
        x = step(scheduler, i, x)
    return x


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_renoising_is_the_forward_process(name):
    scheduler = _fresh(SCHEDULERS[name], 10)
    ts = scheduler.timesteps.tolist()
    plan = restart_plan(scheduler, min(ts[3], ts[6]), max(ts[3], ts[6]), K=1)
    assert (plan.first, plan.last) == (3, 6)
    s_lo, n_lo = _signal_noise(scheduler, float(scheduler.sigmas[7]))
    s_hi, n_hi = _signal_noise(scheduler, float(scheduler.sigmas[3]))
    assert math.isclose(plan.scale * s_lo, s_hi, rel_tol=1e-6)
    assert math.isclose(plan.scale ** 2 * n_lo ** 2 + plan.std ** 2, n_hi ** 2, rel_tol=1e-6)
    assert plan.std > 0


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_bare_solver_loop_matches_the_definition(name):
    make, n, K, shape = SCHEDULERS[name], 8, 2, (1, 2, 3, 4)

    def toy(x, t):  # any deterministic function of (x, t)
        return 0.3 * x + 0.001 * float(t) * torch.ones_like(x)

    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ts = _fresh(make, n).timesteps.tolist()
    lo, hi = min(ts[2], ts[4]), max(ts[2], ts[4])
    scheduler = make()
    with apply_restart(scheduler, lo, hi, K=K, seed=9) as handle:
        scheduler.set_timesteps(n)
        x = x0
        for t in scheduler.timesteps:
            x = scheduler.step(toy(x, t), t, x, return_dict=False)[0]
        assert handle.plan.order == tuple(range(5)) + (2, 3, 4) * K + tuple(range(5, n))
    ref = _reference_loop(make, n, lo, hi, K, x0, toy, _noises(torch.Generator().manual_seed(9), shape, K))
    _check(x, ref)
    # Restarting the history matters: the same loop keeping the first pass's history differs.
    assert not torch.equal(x, _kept_history(make, n, lo, hi, K, x0, toy, _noises(torch.Generator().manual_seed(9),
                                                                               shape, K)))


def _kept_history(make, n, lo, hi, K, x, model_output, noises):
    scheduler = _fresh(make, n)
    renoise = _renoise(scheduler)
    a, b = _segment(scheduler.timesteps, lo, hi)
    order = list(range(b + 1)) + list(range(a, b + 1)) * K + list(range(b + 1, n))
    ends = {b + k * (b - a + 1) for k in range(K)}
    for pos, i in enumerate(order):
        scheduler._step_index = i
        x = scheduler.step(model_output(x, scheduler.timesteps[i]), scheduler.timesteps[i], x, return_dict=False)[0]
        if pos in ends:
            x = renoise(a, b, x, noises[len([e for e in ends if e < pos])])
    return x


def test_skyreels_v2_default_scheduler_matches_the_definition():
    """SkyReels-V2's pipeline with its default UniPC (flow sigmas): the pipeline under apply_restart equals the
    definition written out around the stock denoiser (CFG as the pipeline combines it)."""
    tp = tiny_pipeline("skyreels_v2", vae=False)
    pipe, steps, K = tp.pipe, 6, 1
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    latents = torch.randn(tp.latent_shape, generator=torch.Generator().manual_seed(11))
    kw = tp.call_kwargs(steps=steps, latents=latents, seed=5)
    probe = type(pipe.scheduler).from_config(pipe.scheduler.config)
    probe.set_timesteps(steps)
    ts = probe.timesteps.tolist()
    lo, hi = min(ts[2], ts[3]), max(ts[2], ts[3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with apply_restart(pipe, lo, hi, K=K, seed=3):
            out = pipe(**kw).frames
        stock = pipe(**kw).frames
    model, g = pipe.transformer, kw["guidance_scale"]

    def cfg(x, t):
        c = model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=kw["prompt_embeds"],
                  return_dict=False)[0]
        u = model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=kw["negative_prompt_embeds"],
                  return_dict=False)[0]
        return u + g * (c - u)

    make = lambda: type(pipe.scheduler).from_config(pipe.scheduler.config)  # noqa: E731
    with torch.no_grad():
        ref = _reference_loop(make, steps, lo, hi, K, latents, cfg,
                              _noises(torch.Generator().manual_seed(3), latents.shape, K))
    _check(out, ref)
    assert not torch.equal(out, stock)
