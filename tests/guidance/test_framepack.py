"""HunyuanVideoFramepackPipeline end to end with STG (issue 15), on the tiny pipeline of
stg_ext.testing.tiny_framepack.

FramePack samples a video in sections, each a denoising run of its own (the pipeline calls set_timesteps again), with
separate cond / uncond calls and true CFG `u + g (c - u)`. Two sections (9 frames, latent window 2), 2 steps each:
- scale 0 equals the stock pipeline bit for bit, and remove_stg restores it bit for bit;
- the perturbed branch against the plain reference of tests/guidance/caches/_reference.py (no cache here): each cond
  call's output stays, each uncond call returns what makes the pipeline's CFG line give f = u + g (c - u) + s (c - p),
  p from a deep copy of the transformer patched by the plain per-family references of
  tests/weak/models/test_hunyuan_video_framepack.py (dual-stream layer 1, single-stream layer 2).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import stg_ext
from stg_ext.testing.tiny_framepack import tiny_framepack
from tests.weak.models import test_hunyuan_video_framepack

from .caches._reference import Family, Pipeline, check

STEPS = 2
FRAMES = 9  # two sections
FAMILY = Family("hunyuan_video_framepack", test_hunyuan_video_framepack.TestHunyuanVideoFramepack, "separate",
                cfg_key="true_cfg_scale")


def _latents(tp, **overrides) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sections = tp.pipe(**tp.call_kwargs(steps=STEPS, num_frames=FRAMES, **overrides)).frames
    assert len(sections) == 2 and tuple(sections[-1].shape) == (1, 4, 1 + 2 * 2, 8, 8)  # image + 2 sections of 2
    return sections[-1]  # the history latents after the last section: every generated frame


@pytest.fixture(scope="module")
def stock():
    return _latents(tiny_framepack())


@pytest.mark.parametrize("mode", ["attention", "residual"])
def test_scale_zero_and_remove_give_stock_bit_for_bit(stock, mode):
    tp = tiny_framepack()
    with stg_ext.apply_stg(tp.pipe, 1, mode, scale=0.0):
        assert torch.equal(_latents(tp), stock)
    session = stg_ext.apply_stg(tp.pipe, 1, mode)
    assert not torch.equal(_latents(tp), stock), "STG changed nothing"
    session.remove()
    assert torch.equal(_latents(tp), stock)


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("mode", ["attention", "residual"])
def test_matches_the_plain_reference(stock, mode, layer):
    pl = Pipeline(tiny_framepack(), FAMILY)
    pl.run = lambda steps, **overrides: _latents(pl.tp, **overrides)
    ref = pl.reference(mode, STEPS, layer=layer)
    with stg_ext.apply_stg(pl.tp.pipe, layer, mode):
        out = _latents(pl.tp)
    check(out, ref, stock)
