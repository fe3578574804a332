"""No host-device synchronization from stg_ext's own code during sampled steps (issue 12).

While a pipeline samples (from its first denoiser call on, i.e. after set-up), `Tensor.item`, `Tensor.tolist`,
`Tensor.__bool__`, `Tensor.__float__`, `Tensor.__int__` and `torch.equal` raise when stg_ext's code calls them
directly: each would wait for the device at every step on a GPU. STG with rescale, and restart where the
pipeline's scheduler supports it. What diffusers' own code calls is recorded, not counted (on these tiny
pipelines: the schedulers' and pipelines' `.item()`/`.tolist()`/`bool()` of timesteps, sigmas and masks).
"""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

ROOT = os.path.dirname(os.path.abspath(stg_ext.__file__))
SYNCS = {"item": torch.Tensor, "tolist": torch.Tensor, "__bool__": torch.Tensor, "__float__": torch.Tensor,
         "__int__": torch.Tensor, "equal": torch}
RESTART = {"wan": (300, 700), "mochi": (300, 700), "ltx": (300, 700), "hunyuan_video": (300, 700),
           "cogvideox": (300, 700), "svd": (-0.5, 0.5), "latte": (300, 700), "easyanimate": (300, 700),
           "cosmos": (0.0, 1.5), "wan22": (300, 700), "allegro": (0.5, 5.0)}


class _Guard:
    def __init__(self):
        self.active = False
        self.ours, self.theirs = [], set()


@contextmanager
def no_sync_from_stg_ext(models):
    guard = _Guard()
    saved = {}

    def wrap(name, original):
        def checked(*args, **kwargs):
            if guard.active:
                frame = sys._getframe(1)
                where = f"{os.path.relpath(frame.f_code.co_filename, os.path.dirname(ROOT))}:{frame.f_lineno}"
                if frame.f_code.co_filename.startswith(ROOT):
                    guard.ours.append(f"{name} at {where}")
                    raise AssertionError(f"stg_ext synchronizes with the device: {name} at {where}")
                if "diffusers" in frame.f_code.co_filename:
                    guard.theirs.add(f"{name} in {os.path.basename(frame.f_code.co_filename)}")
            return original(*args, **kwargs)
        return checked

    for name, owner in SYNCS.items():
        saved[name] = getattr(owner, name)
        setattr(owner, name, wrap(name, saved[name]))
    hooks = [m.register_forward_pre_hook(lambda *a: setattr(guard, "active", True)) for m in models]
    try:
        yield guard
    finally:
        guard.active = False
        for h in hooks:
            h.remove()
        for name, owner in SYNCS.items():
            setattr(owner, name, saved[name])


@pytest.mark.parametrize("family", ["wan", "wan22", "mochi", "ltx", "hunyuan_video", "cogvideox", "svd", "latte",
                                    "allegro", "cosmos", "easyanimate", "skyreels_v2"])
def test_no_device_sync_in_stg_steps(family):
    tp = tiny_pipeline(family, vae=False)
    models = [getattr(tp.pipe, name) for name in tp.denoiser_attrs]
    handles = [stg_ext.apply_stg(tp.pipe, 1, "attention" if family not in ("svd", "latte") else "spatial",
                                 scale=1.0, rescale=0.7, stop=0.75)]
    if family in RESTART:
        handles.append(stg_ext.apply_restart(tp.pipe, *RESTART[family], K=1, seed=0))
    try:
        kw = tp.call_kwargs(steps=4)
        with warnings.catch_warnings(), no_sync_from_stg_ext(models) as guard:
            warnings.simplefilter("ignore")
            out = tp.pipe(**kw).frames
        assert not guard.ours
        assert torch.isfinite(torch.as_tensor(out)).all()
    finally:
        for h in reversed(handles):
            h.remove()
