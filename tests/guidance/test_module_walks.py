"""No walk over the denoiser's modules from stg_ext's code in a run's later calls.

A walk over every module of a large denoiser costs milliseconds of Python (Mochi's 2410 modules: 9-13 ms here for
the two walks each STG call used to make: the cache check and the cache bypass), paid on the host at every step. The
session scans the caches where it checks them (apply, each run's start and first call: caches.CacheScan); from the
run's second denoiser call on, `nn.Module.named_modules` (which `modules()` calls) must not be called from stg_ext.
"""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

ROOT = os.path.dirname(os.path.abspath(stg_ext.__file__))


@contextmanager
def walks_from_stg_ext(model: nn.Module):
    """Yields a list that collects where stg_ext's code walked a module tree after `model`'s first call."""
    seen, state = [], {"calls": 0}
    original = nn.Module.named_modules

    def counted(self, *args, **kwargs):
        if state["calls"]:
            frame = sys._getframe(1)
            # modules() is named_modules' own caller: look one frame further
            if frame is not None and frame.f_code.co_name == "modules":
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(ROOT):
                seen.append(f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno}")
        return original(self, *args, **kwargs)

    handle = model.register_forward_hook(lambda *a: state.__setitem__("calls", state["calls"] + 1))
    nn.Module.named_modules = counted
    try:
        yield seen, state
    finally:
        nn.Module.named_modules = original
        handle.remove()


@pytest.mark.parametrize("family,mode", [("wan", "attention"), ("mochi", "residual"), ("ltx", "attention")])
def test_later_calls_walk_no_modules(family, mode):
    tp = tiny_pipeline(family, vae=False)
    model = getattr(tp.pipe, tp.denoiser_attrs[0])
    handle = stg_ext.apply_stg(tp.pipe, 1, mode, scale=1.0, rescale=0.7)
    try:
        with warnings.catch_warnings(), walks_from_stg_ext(model) as (seen, state):
            warnings.simplefilter("ignore")
            out = tp.pipe(**tp.call_kwargs(steps=3)).frames
        assert state["calls"] >= 3  # the run's later calls were watched
        assert not seen, seen
        assert torch.isfinite(torch.as_tensor(out)).all()
    finally:
        handle.remove()


def test_a_cache_enabled_after_apply_is_in_the_scan_of_the_run():
    # The scan is taken again at the run's start: a cache enabled between apply_stg and the run is seen (the
    # perturbed passes bypass it, the stock passes use it), as tests/guidance/caches/test_orders.py checks in full.
    from diffusers import FirstBlockCacheConfig

    tp = tiny_pipeline("wan", vae=False)
    handle = stg_ext.apply_stg(tp.pipe, 1, "attention", scale=1.0)
    try:
        tp.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
        session = stg_ext.guidance.attached.session_of(tp.pipe.transformer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tp.pipe(**tp.call_kwargs(steps=2))
        branch = next(iter(session.branches.values()))
        assert [kind.name for kind in branch.cache_scan.kinds] == ["First Block Cache"]
    finally:
        tp.pipe.transformer.disable_cache()
        handle.remove()
