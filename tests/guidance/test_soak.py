"""Soak (issue 15): 500 denoising steps on a tiny pipeline with STG (rescale on) and restart: the live tensors and
the hooks do not grow, within a run or from run to run; after remove_stg and remove_restart nothing of stg_ext is
left (no hook, no attribute, no wrapper) and the live tensors are back to the stock pipeline's count.

Counts: `gc.get_objects()` tensors (after `gc.collect()`), and every diffusers hook and torch module hook on the
pipeline's modules plus the instance attributes stg_ext sets on the pipeline, its scheduler and its modules.
"""
from __future__ import annotations

import gc
import warnings

import pytest
import torch

import stg_ext
from stg_ext.guidance.restart import apply_restart, remove_restart
from stg_ext.testing.tiny import tiny_pipeline

# 3 runs: 100 steps each with a 50-step restart segment run once more (K=1): 150 loop steps, 450 in all, plus the
# warm-up run's 50.
STEPS, K = 100, 1
SIZE = dict(num_frames=1, height=16, width=16)  # the tiny Wan at one latent frame of 2 x 2: a step is cheap


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _modules(pipe):
    return [m for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()]


def _hooks(pipe) -> int:
    n = 0
    for module in _modules(pipe):
        registry = getattr(module, "_diffusers_hook", None)
        n += len(registry.hooks) if registry is not None else 0
        n += len(module._forward_hooks) + len(module._forward_pre_hooks)
    return n


def _stg_traces(pipe) -> list:
    """What of stg_ext is on the pipeline: its hooks, attributes, and wrapped methods."""
    found = []
    for obj in [pipe, pipe.scheduler, *_modules(pipe)]:
        for name, value in vars(obj).items():
            if name.startswith("_stg_ext") or "stg_ext" in type(value).__module__:
                found.append(f"{type(obj).__name__}.{name}")
        registry = getattr(obj, "_diffusers_hook", None)
        if registry is not None:
            found += [f"{type(obj).__name__} hook {h}" for h in registry.hooks if h.startswith("stg_ext")]
    return found


def _run(tp, steps, callback=None):
    kw = tp.call_kwargs(steps=steps, **SIZE)
    if callback is not None:
        kw["callback_on_step_end"] = callback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pipe(**kw).frames


@pytest.mark.slow
def test_500_steps_no_growth_and_nothing_left():
    tp = tiny_pipeline("wan", vae=False)
    _run(tp, 2)  # stock warm-up (lazy buffers, caches of torch and diffusers)
    stock_tensors, stock_hooks = _live_tensors(), _hooks(tp.pipe)
    assert _stg_traces(tp.pipe) == []

    stg_ext.apply_stg(tp.pipe, 1, "attention", scale=1.0, rescale=0.7)
    probe = tp.pipe.scheduler
    probe.set_timesteps(STEPS)
    ts = probe.timesteps.tolist()
    apply_restart(tp.pipe, ts[69], ts[20], K=K, seed=0)  # steps 20..69 re-run once
    hooks = _hooks(tp.pipe)
    _run(tp, 50)  # warm-up with STG and restart

    within = {}

    def count(pipe, i, t, kwargs):
        if i in (10, 140):  # early and late in the extended loop of 150 steps
            within[i] = _live_tensors()
        return kwargs

    after = []
    for _ in range(3):
        out = _run(tp, STEPS, count)
        assert torch.isfinite(out).all()
        assert tp.pipe._num_timesteps == STEPS + K * 50
        del out
        after.append(_live_tensors())
        assert within[140] == within[10], f"live tensors grew within a run: {within}"
        assert _hooks(tp.pipe) == hooks
    assert after[0] == after[1] == after[2], f"live tensors after each run: {after}"

    print(f"soak: live tensors stock {stock_tensors}, within a run {within}, after each run {after}; hooks stock "
          f"{stock_hooks}, with STG and restart {hooks}")
    remove_restart(tp.pipe)
    stg_ext.remove_stg(tp.pipe)
    assert _stg_traces(tp.pipe) == []
    assert _hooks(tp.pipe) == stock_hooks
    assert _live_tensors() == stock_tensors
