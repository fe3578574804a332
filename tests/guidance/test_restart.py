"""STG with Restart (Algorithm 3, stg_ext.guidance.restart) on stock pipelines and bare schedulers.

Tiny random pipelines from stg_ext.testing.tiny (CPU, fp32, 4 steps, output_type="latent"): Wan (flow matching), SVD
(EDM Euler, v-prediction), CogVideoX (CogVideoXDDIMScheduler, VP). The references are hand-written loops that call
the denoiser directly, the scheduler's own `scale_model_input` / `step` at an explicitly set step index, and the
re-noising formulas written out here again; tolerance max abs diff <= 1e-4 x max|latents|.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, List, Tuple

import pytest
import torch

import stg_ext
from stg_ext.guidance.restart import SUPPORTED_SCHEDULERS, apply_restart, loop_step, remove_restart, restart_plan
from stg_ext.testing.tiny import tiny_pipeline

# diffusers' Euler schedulers build their sigmas with np.array(tensor), which numpy 2 flags.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEPS = 4
TOL = 1e-4
# A window holding steps 1 and 2 of the 4-step schedule, and one holding none, per family (timestep units):
# wan [1000, 857.7, 602.2, 8.9], svd [1.638, 1.064, 0.205, -1.554], cogvideox [999, 749, 499, 249].
WINDOWS = {"wan": ((500.0, 900.0), (700.0, 800.0)),
           "svd": ((0.0, 1.2), (0.3, 1.0)),
           "cogvideox": ((400.0, 800.0), (550.0, 700.0))}


@pytest.fixture(scope="module")
def pipelines():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny_pipeline(name, vae=False)
        return cache[name]
    return get


def _run(tp, **overrides) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pipe(**tp.call_kwargs(steps=STEPS, **overrides)).frames


@contextmanager
def _counting(module: torch.nn.Module):
    calls: List[int] = []
    handle = module.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def _denoiser(tp):
    return getattr(tp.pipe, tp.denoiser_attrs[0])


def _state(scheduler) -> Dict[str, object]:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in scheduler.__dict__.items()}


def _same_state(a: Dict[str, object], b: Dict[str, object]) -> bool:
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, torch.Tensor):
            if not (isinstance(w, torch.Tensor) and v.dtype == w.dtype and v.device == w.device and torch.equal(v, w)):
                return False
        elif v != w:
            return False
    return True


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= TOL * scale, f"max abs diff {err:.3g} > {TOL} x {scale:.3g}"


# --------------------------------------------------------------------------------------------------
# (a) K = 0 and an empty window are the stock pipeline, bit for bit
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(WINDOWS))
def test_no_restart_is_stock_bit_for_bit(pipelines, family, caplog):
    tp = pipelines(family)
    stock = _run(tp)
    (lo, hi), (empty_lo, empty_hi) = WINDOWS[family]
    with apply_restart(tp.pipe, lo, hi, K=0) as handle:
        assert torch.equal(_run(tp), stock)
        assert handle.plan.extra_steps == 0
    with caplog.at_level(logging.WARNING, logger="stg_ext"):
        with apply_restart(tp.pipe, empty_lo, empty_hi, K=3) as handle:
            assert torch.equal(_run(tp), stock)
            assert handle.plan.first is None and handle.plan.extra_steps == 0
    assert "no step of this run lies in" in caplog.text


# --------------------------------------------------------------------------------------------------
# (b) K restarts add exactly K * m denoising steps
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(WINDOWS))
@pytest.mark.parametrize("K", [1, 2])
def test_denoiser_calls_grow_by_k_times_segment(pipelines, family, K):
    tp = pipelines(family)
    with _counting(_denoiser(tp)) as calls:
        _run(tp)
    per_step = len(calls) // STEPS  # wan: cond + uncond calls; svd, cogvideox: one batched call
    lo, hi = WINDOWS[family][0]
    with apply_restart(tp.pipe, lo, hi, K=K, seed=0) as handle, _counting(_denoiser(tp)) as calls:
        _run(tp)
        plan = handle.plan
    m = 2  # steps 1 and 2
    assert (plan.first, plan.last, plan.extra_steps) == (1, 2, K * m)
    assert plan.order == (0, 1, 2) + (1, 2) * K + (3,)
    assert len(calls) == per_step * (STEPS + K * m)


def test_loop_sees_the_extended_loop_and_loop_step_maps_it_back(pipelines):
    tp = pipelines("wan")
    seen: List[Tuple[int, float, object]] = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, float(t), loop_step(pipe, i)))
        return {}

    with apply_restart(tp.pipe, 500.0, 900.0, K=2, seed=0):
        _run(tp, callback_on_step_end=callback)
        n_timesteps = tp.pipe._num_timesteps
    order = (0, 1, 2, 1, 2, 1, 2, 3)
    assert n_timesteps == len(order)
    assert [i for i, _, _ in seen] == list(range(len(order)))
    # the last step's callback runs after the run is complete: no restarted run in progress any more
    assert [s for _, _, s in seen[:-1]] == [(o, STEPS) for o in order[:-1]] and seen[-1][2] is None
    ts = tp.pipe.scheduler.timesteps
    assert [t for _, t, _ in seen] == [float(ts[o]) for o in order]


def test_sigma_unit_selects_by_noise_level(pipelines):
    tp = pipelines("wan")
    tp.pipe.scheduler.set_timesteps(STEPS)
    by_t = restart_plan(tp.pipe.scheduler, 500.0, 900.0, K=1)
    by_sigma = restart_plan(tp.pipe.scheduler, 0.5, 0.9, K=1, unit="sigma")
    assert by_t == by_sigma and by_t.extra_steps == 2


# --------------------------------------------------------------------------------------------------
# (c) the final latents equal a hand-written restart loop
# --------------------------------------------------------------------------------------------------

def _segment(timesteps: torch.Tensor, lo: float, hi: float) -> Tuple[int, int]:
    inside = [i for i, t in enumerate(timesteps.tolist()) if lo <= t <= hi]
    return inside[0], inside[-1]


def _restart_loop(scheduler, lo: float, hi: float, K: int, x: torch.Tensor, step: Callable[[int, torch.Tensor],
                  torch.Tensor], renoise: Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor],
                  noises: List[torch.Tensor]) -> torch.Tensor:
    """Algorithm 3 written out: steps 0..b, then K x (re-noise b+1 -> a, steps a..b), then b+1..N-1."""
    a, b = _segment(scheduler.timesteps, lo, hi)
    for i in range(b + 1):
        x = step(i, x)
    for k in range(K):
        x = renoise(a, b, x, noises[k])
        for i in range(a, b + 1):
            x = step(i, x)
    for i in range(b + 1, len(scheduler.timesteps)):
        x = step(i, x)
    return x


def _noises(generator: torch.Generator, shape, K: int) -> List[torch.Tensor]:
    return [torch.randn(shape, generator=generator, dtype=torch.float32) for _ in range(K)]


def _flow_renoise(scheduler):
    def renoise(a, b, x, eps):
        s_hi, s_lo = float(scheduler.sigmas[a]), float(scheduler.sigmas[b + 1])
        r = (1 - s_hi) / (1 - s_lo)  # x_s = (1 - s) x0 + s eps
        return (x * r + eps * math.sqrt(s_hi ** 2 - (r * s_lo) ** 2)).to(x.dtype)
    return renoise


def _ve_renoise(scheduler):
    def renoise(a, b, x, eps):
        s_hi, s_lo = float(scheduler.sigmas[a]), float(scheduler.sigmas[b + 1])  # x_s = x0 + s eps
        return (x * 1.0 + eps * math.sqrt(s_hi ** 2 - s_lo ** 2)).to(x.dtype)
    return renoise


def _ddim_renoise(scheduler):
    def renoise(a, b, x, eps):
        t_a, t_b = int(scheduler.timesteps[a]), int(scheduler.timesteps[b])
        prev = t_b - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        abar_lo = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        ratio = float(scheduler.alphas_cumprod[t_a]) / abar_lo  # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        return (x * math.sqrt(ratio) + eps * math.sqrt(1 - ratio)).to(x.dtype)
    return renoise


def test_wan_matches_reference_loop(pipelines):
    """Flow matching; the re-noising draws from the pipeline's own generator (latents given, so the pipeline
    draws nothing itself)."""
    tp = pipelines("wan")
    pipe, K, (lo, hi) = tp.pipe, 2, WINDOWS["wan"][0]
    latents = torch.randn(tp.latent_shape, generator=torch.Generator().manual_seed(11))
    kw = tp.call_kwargs(steps=STEPS, latents=latents, seed=5)
    with apply_restart(pipe, lo, hi, K=K):
        out = pipe(**kw).frames

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    model, g = pipe.transformer, kw["guidance_scale"]

    def step(i, x):
        t = scheduler.timesteps[i]
        c = model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=kw["prompt_embeds"],
                  return_dict=False)[0]
        u = model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=kw["negative_prompt_embeds"],
                  return_dict=False)[0]
        scheduler._step_index = i
        return scheduler.step(u + g * (c - u), t, x, return_dict=False)[0]

    with torch.no_grad():
        ref = _restart_loop(scheduler, lo, hi, K, latents, step, _flow_renoise(scheduler),
                            _noises(torch.Generator().manual_seed(5), latents.shape, K))
    _check(out, ref)
    assert not torch.equal(out, _run(tp, latents=latents, seed=5))


def _capture_first_call(tp, **overrides) -> Tuple[tuple, dict]:
    captured = []

    def hook(module, args, kwargs):
        if not captured:
            captured.append((args, dict(kwargs)))

    handle = _denoiser(tp).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run(tp, **overrides)
    finally:
        handle.remove()
    return captured[0]


def test_svd_matches_reference_loop(pipelines):
    """EDM Euler (v-prediction, Karras sigmas); per-frame CFG; the re-noising seeded with seed=."""
    tp = pipelines("svd")
    pipe, K, (lo, hi) = tp.pipe, 1, WINDOWS["svd"][0]
    latents = torch.randn(tp.latent_shape, generator=torch.Generator().manual_seed(11))
    args, kwargs = _capture_first_call(tp, latents=latents)
    image_latents = args[0][:, :, 4:]  # the conditioning half of [scaled latents, image latents] (channels)
    with apply_restart(pipe, lo, hi, K=K, seed=7):
        out = _run(tp, latents=latents)

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    kw = tp.call_kwargs(steps=STEPS)
    g = torch.linspace(kw["min_guidance_scale"], kw["max_guidance_scale"], kw["num_frames"]).reshape(1, -1, 1, 1, 1)

    def step(i, x):
        t = scheduler.timesteps[i]
        scheduler._step_index = i
        inp = torch.cat([scheduler.scale_model_input(torch.cat([x] * 2), t), image_latents], dim=2)
        u, c = pipe.unet(inp, t, encoder_hidden_states=kwargs["encoder_hidden_states"],
                         added_time_ids=kwargs["added_time_ids"], return_dict=False)[0].chunk(2)
        scheduler._step_index = i
        return scheduler.step(u + g * (c - u), t, x).prev_sample

    with torch.no_grad():
        ref = _restart_loop(scheduler, lo, hi, K, latents * scheduler.init_noise_sigma, step, _ve_renoise(scheduler),
                            _noises(torch.Generator().manual_seed(7), latents.shape, K))
    _check(out, ref)


def test_cogvideox_matches_reference_loop(pipelines):
    """VP: CogVideoXDDIMScheduler (v-prediction, SNR-shifted alphas)."""
    tp = pipelines("cogvideox")
    pipe, K, (lo, hi) = tp.pipe, 2, WINDOWS["cogvideox"][0]
    latents = torch.randn(tp.latent_shape, generator=torch.Generator().manual_seed(11))
    _, kwargs = _capture_first_call(tp, latents=latents)
    with apply_restart(pipe, lo, hi, K=K, seed=3):
        out = _run(tp, latents=latents)

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    g = tp.call_kwargs()["guidance_scale"]

    def step(i, x):
        t = scheduler.timesteps[i]
        inp = scheduler.scale_model_input(torch.cat([x] * 2), t)
        call = dict(kwargs, hidden_states=inp, timestep=t.expand(2))
        u, c = pipe.transformer(**call)[0].float().chunk(2)
        return scheduler.step(u + g * (c - u), t, x, return_dict=False)[0]

    with torch.no_grad():
        ref = _restart_loop(scheduler, lo, hi, K, latents * scheduler.init_noise_sigma, step,
                            _ddim_renoise(scheduler), _noises(torch.Generator().manual_seed(3), latents.shape, K))
    _check(out, ref)


def test_same_seed_same_video_other_seed_other_video(pipelines):
    tp = pipelines("wan")
    lo, hi = WINDOWS["wan"][0]
    with apply_restart(tp.pipe, lo, hi, K=1, seed=1):
        a, b = _run(tp), _run(tp)
    with apply_restart(tp.pipe, lo, hi, K=1, seed=2):
        c = _run(tp)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------------------------------
# (d) remove() restores the scheduler exactly
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(WINDOWS))
def test_remove_restores_the_scheduler(pipelines, family):
    tp = pipelines(family)
    scheduler = tp.pipe.scheduler
    stock = _run(tp)
    stock_state = _state(scheduler)
    handle = apply_restart(tp.pipe, *WINDOWS[family][0], K=2, seed=0)
    assert "step" in scheduler.__dict__
    restarted = _run(tp)
    assert not torch.equal(restarted, stock)
    # after a complete run the scheduler is left as a stock run leaves it (apart from the wrappers)
    wrappers = {k for k in scheduler.__dict__ if k not in stock_state}
    assert wrappers <= {"set_timesteps", "step", "scale_model_input", "scale_noise", "add_noise", "_stg_ext_restart"}
    assert _same_state({k: v for k, v in _state(scheduler).items() if k not in wrappers}, stock_state)
    handle.remove()
    handle.remove()  # idempotent
    assert _same_state(_state(scheduler), stock_state)
    assert not hasattr(tp.pipe, "_stg_ext_restart")
    assert torch.equal(_run(tp), stock) and _same_state(_state(scheduler), stock_state)


def test_remove_mid_run_and_replace(pipelines):
    tp = pipelines("wan")
    scheduler = tp.pipe.scheduler
    _run(tp)
    stock_state = _state(scheduler)

    class Stop(Exception):
        pass

    def stop_mid_run(pipe, i, t, kwargs):
        if i == 3:
            remove_restart(pipe)
            raise Stop
        return {}

    apply_restart(tp.pipe, 500.0, 900.0, K=1, seed=0)
    with pytest.raises(Stop):
        _run(tp, callback_on_step_end=stop_mid_run)
    assert "step" not in scheduler.__dict__ and not hasattr(scheduler, "_stg_ext_restart")
    assert torch.equal(scheduler.timesteps, stock_state["timesteps"])
    # applying twice replaces
    first = apply_restart(tp.pipe, 500.0, 900.0, K=1)
    second = apply_restart(tp.pipe, 500.0, 900.0, K=2)
    assert getattr(tp.pipe, "_stg_ext_restart") is second and getattr(scheduler, "_stg_ext_restart") is second
    first.remove()  # a replaced handle's remove is a no-op
    assert "step" in scheduler.__dict__
    stg_ext.remove_restart(tp.pipe)
    assert not {"set_timesteps", "step", "scale_model_input", "scale_noise"} & scheduler.__dict__.keys()


# --------------------------------------------------------------------------------------------------
# (e) composes with apply_stg
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["wan", "svd"])
def test_composes_with_stg(pipelines, family):
    tp = pipelines(family)
    lo, hi = WINDOWS[family][0]
    layer = 7 if family == "svd" else 1
    with apply_restart(tp.pipe, lo, hi, K=1, seed=0):
        restart_only = _run(tp)
        with stg_ext.apply_stg(tp.pipe, layer, "attention", scale=0.0):
            assert torch.equal(_run(tp), restart_only)  # STG at scale 0 is the stock step, bit for bit
        with stg_ext.apply_stg(tp.pipe, layer, "attention", scale=1.0):
            both = _run(tp)
    with stg_ext.apply_stg(tp.pipe, layer, "attention", scale=1.0):
        stg_only = _run(tp)
        # applied in the other order
        with apply_restart(tp.pipe, lo, hi, K=1, seed=0):
            assert torch.equal(_run(tp), both)
    assert torch.isfinite(both).all()
    assert not torch.equal(both, restart_only) and not torch.equal(both, stg_only)


# --------------------------------------------------------------------------------------------------
# (f) bad arguments
# --------------------------------------------------------------------------------------------------

def test_bad_arguments(pipelines):
    from diffusers import DEISMultistepScheduler

    tp = pipelines("wan")
    pipe = tp.pipe
    with pytest.raises(ValueError, match="t_min < t_max"):
        apply_restart(pipe, 700.0, 300.0)
    with pytest.raises(ValueError, match="t_min < t_max"):
        apply_restart(pipe, 500.0, 500.0)
    for K in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="integer >= 0"):
            apply_restart(pipe, 300.0, 700.0, K=K)
    with pytest.raises(ValueError, match="'timestep', 'sigma'"):
        apply_restart(pipe, 300.0, 700.0, unit="fraction")
    with pytest.raises(ValueError, match="finite number"):
        apply_restart(pipe, float("nan"), 700.0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        apply_restart(pipe, 300.0, 700.0, seed=1.5)
    with pytest.raises(TypeError, match="neither a diffusers pipeline"):
        apply_restart(pipe.transformer, 300.0, 700.0)
    deis = DEISMultistepScheduler()
    with pytest.raises(TypeError, match="DEISMultistepScheduler is not supported.*FlowMatchEulerDiscreteScheduler.*"
                                        "EulerDiscreteScheduler.*CogVideoXDDIMScheduler.*UniPCMultistepScheduler.*"
                                        "DPMSolverMultistepScheduler"):
        apply_restart(deis, 300.0, 700.0)
    assert "step" not in pipe.scheduler.__dict__  # nothing was installed


def test_pipeline_loop_must_follow_the_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    x = torch.zeros(2)
    with apply_restart(scheduler, 300.0, 800.0, K=1, seed=0):
        scheduler.set_timesteps(4)  # [1000, 667, 334, 1] -> loop 1000, 667, 334, 667, 334, 1
        scheduler.step(x, scheduler.timesteps[0], x)
        with pytest.raises(RuntimeError, match="enumerate\\(timesteps\\)"):
            scheduler.step(x, scheduler.timesteps[2], x)
        # a loop that starts later (a schedule cut by strength, no begin index) is picked up where it starts
        scheduler.set_timesteps(4)
        for t in scheduler.timesteps[1:]:
            x = scheduler.step(torch.ones(2), t, x, return_dict=False)[0]
        # the run completed: the scheduler is back to its stock end state
        assert scheduler.step_index == 4 and scheduler.timesteps.tolist() == [1000.0, 667.0, 334.0, 1.0]


# --------------------------------------------------------------------------------------------------
# Every supported scheduler, bare: a toy denoiser, the stock loop shape vs Algorithm 3 by hand
# --------------------------------------------------------------------------------------------------

# The multistep solvers (UniPC, DPM-Solver) restart their history at each pass: tests/guidance/test_restart_multistep.py.
SINGLE_STEP = [n for n in SUPPORTED_SCHEDULERS if n not in ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")]


def _schedulers():
    import diffusers

    ddpm_like = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    return {
        "FlowMatchEulerDiscreteScheduler": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        "EulerDiscreteScheduler": lambda: diffusers.EulerDiscreteScheduler(**ddpm_like),
        "EulerAncestralDiscreteScheduler": lambda: diffusers.EulerAncestralDiscreteScheduler(**ddpm_like),
        "EDMEulerScheduler": lambda: diffusers.EDMEulerScheduler(),
        "DDIMScheduler": lambda: diffusers.DDIMScheduler(**ddpm_like, clip_sample=False),
        "CogVideoXDDIMScheduler": lambda: diffusers.CogVideoXDDIMScheduler(),
        "DDPMScheduler": lambda: diffusers.DDPMScheduler(**ddpm_like, clip_sample=False),
    }


def _levels(scheduler, i: int, after: bool) -> Tuple[float, float]:
    """(signal, noise) coefficients of x = signal x0 + noise eps entering step i, or after step i; written from
    each scheduler's definition."""
    name = type(scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler":
        s = float(scheduler.sigmas[i + after])
        return 1 - s, s
    if name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "EDMEulerScheduler"):
        return 1.0, float(scheduler.sigmas[i + after])
    t = int(scheduler.timesteps[i])
    if after and name == "DDPMScheduler":
        prev = int(scheduler.timesteps[i + 1]) if i + 1 < len(scheduler.timesteps) else -1
        abar = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else 1.0
    elif after:
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        abar = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    else:
        abar = float(scheduler.alphas_cumprod[t])
    return math.sqrt(abar), math.sqrt(1 - abar)


@pytest.mark.parametrize("name", SINGLE_STEP)
def test_renoising_is_the_forward_process(name):
    """x_hi = scale x_lo + std eps maps the marginal after step b onto the marginal entering step a."""
    scheduler = _schedulers()[name]()
    scheduler.set_timesteps(10)
    ts = scheduler.timesteps.tolist()
    plan = restart_plan(scheduler, min(ts[3], ts[6]), max(ts[3], ts[6]), K=1)
    assert (plan.first, plan.last) == (3, 6)
    sig_lo, noise_lo = _levels(scheduler, 6, after=True)
    sig_hi, noise_hi = _levels(scheduler, 3, after=False)
    assert math.isclose(plan.scale * sig_lo, sig_hi, rel_tol=1e-6)
    assert math.isclose(plan.scale ** 2 * noise_lo ** 2 + plan.std ** 2, noise_hi ** 2, rel_tol=1e-6)
    assert plan.std > 0


def _init_sigma(scheduler) -> float:
    return float(getattr(scheduler, "init_noise_sigma", 1.0))  # flow matching has none (unit noise)


@pytest.mark.parametrize("name", SINGLE_STEP)
def test_bare_scheduler_loop_matches_algorithm_3(name):
    make = _schedulers()[name]
    shape, K = (1, 2, 3, 4), 2

    def toy(x, t):  # any deterministic function of (x, t)
        return 0.3 * x + 0.001 * float(t) * torch.ones_like(x)

    def stock_loop(scheduler, x, generator):
        scheduler.set_timesteps(6)
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            x = scheduler.step(toy(inp, t), t, x, generator=generator, return_dict=False)[0]
        return x

    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    scheduler = make()
    scheduler.set_timesteps(6)
    ts = scheduler.timesteps.tolist()
    lo, hi = min(ts[1], ts[3]), max(ts[1], ts[3])
    with apply_restart(scheduler, lo, hi, K=K, seed=9) as handle:
        out = stock_loop(scheduler, x0 * _init_sigma(scheduler), torch.Generator().manual_seed(1))
        assert handle.plan.order == (0, 1, 2, 3) + (1, 2, 3) * K + (4, 5)

    ref_sched = make()
    ref_sched.set_timesteps(6)
    step_gen = torch.Generator().manual_seed(1)
    has_index = hasattr(ref_sched, "_step_index")

    def step(i, x):
        t = ref_sched.timesteps[i]
        if has_index:
            ref_sched._step_index = i
        inp = ref_sched.scale_model_input(x, t) if hasattr(ref_sched, "scale_model_input") else x
        if has_index:
            ref_sched._step_index = i
        return ref_sched.step(toy(inp, t), t, x, generator=step_gen, return_dict=False)[0]

    def renoise(a, b, x, eps):
        sig_lo, noise_lo = _levels(ref_sched, b, after=True)
        sig_hi, noise_hi = _levels(ref_sched, a, after=False)
        scale = sig_hi / sig_lo
        return (x * scale + eps * math.sqrt(noise_hi ** 2 - (scale * noise_lo) ** 2)).to(x.dtype)

    ref = _restart_loop(ref_sched, lo, hi, K, x0 * _init_sigma(ref_sched), step, renoise,
                        _noises(torch.Generator().manual_seed(9), shape, K))
    _check(out, ref)
    # and the scheduler is back to stock: the same loop without restart is the stock loop
    assert "step" not in scheduler.__dict__
    fresh = make()
    assert torch.equal(stock_loop(scheduler, x0 * _init_sigma(fresh), torch.Generator().manual_seed(1)),
                       stock_loop(fresh, x0 * _init_sigma(fresh), torch.Generator().manual_seed(1)))


def test_deep_copy_of_the_scheduler_restarts_on_its_own():
    """LTX-2 deep-copies its scheduler for the audio latents and steps both in one loop."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    def loop(schedulers, x):
        xs = [x] * len(schedulers)
        for s in schedulers:
            s.set_timesteps(5)
        for t in schedulers[0].timesteps:
            xs = [s.step(0.5 * v + 0.001 * float(t), t, v, return_dict=False)[0] for s, v in zip(schedulers, xs)]
        return xs

    x = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(0))
    scheduler = FlowMatchEulerDiscreteScheduler()
    with apply_restart(scheduler, 300.0, 800.0, K=1, seed=4) as handle:
        twin = copy.deepcopy(scheduler)
        assert twin._stg_ext_restart is not handle and twin._stg_ext_restart.seed == 5
        assert twin.step.original.__self__ is twin and twin._stg_ext_restart.scheduler is twin
        a, b = loop([scheduler, twin], x)
        assert handle.plan.extra_steps == 2 and twin._stg_ext_restart.plan.extra_steps == 2
    assert "step" not in scheduler.__dict__
    expected = []
    for seed in (4, 5):
        fresh = FlowMatchEulerDiscreteScheduler()
        with apply_restart(fresh, 300.0, 800.0, K=1, seed=seed):
            expected += loop([fresh], x)
    assert torch.equal(a, expected[0]) and torch.equal(b, expected[1])
    twin._stg_ext_restart.remove()
    assert "step" not in twin.__dict__ and not hasattr(twin, "_stg_ext_restart")
