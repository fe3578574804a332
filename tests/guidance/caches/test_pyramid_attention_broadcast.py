"""STG with Pyramid Attention Broadcast (issue 15): against the plain reference of _reference.py, in both orders.

PAB serves the stock passes' attention as without STG; the perturbed pass bypasses it (was: shape errors on Allegro,
CogVideoX, Latte, LTX, Mochi, a near no-op STG-A when PAB was enabled after apply_stg, and PAB's iteration count
advanced by the perturbed passes)."""
from __future__ import annotations

import pytest
import torch
from diffusers import PyramidAttentionBroadcastConfig

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

from ._reference import FAMILIES, Pipeline, check

STEPS = 4
# HunyuanVideo 1.5 samples through its guider (STG swaps in an STGGuidance whose perturbed batch bypasses PAB).
CASES = [(fam, mode) for fam in ("cogvideox", "latte", "allegro", "mochi", "ltx", "wan", "hunyuan_video",
                                 "hunyuan_video15") for mode in ("attention", "residual")]


def _pab(pipe) -> PyramidAttentionBroadcastConfig:
    # Every timestep in range and every other call broadcast, so that the tiny runs do broadcast (a pipeline without
    # current_timestep, EasyAnimate, is always in range).
    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                           spatial_attention_timestep_skip_range=(-1, 10 ** 6),
                                           current_timestep_callback=lambda: getattr(pipe, "current_timestep", 500))


def _pipeline(family: str) -> Pipeline:
    return Pipeline(tiny_pipeline(family, vae=family == "hunyuan_video15"), FAMILIES[family])


def _iterations(model) -> list:
    return [m._diffusers_hook.get_hook("pyramid_attention_broadcast").state.iteration for m in model.modules()
            if getattr(m, "_diffusers_hook", None) is not None
            and m._diffusers_hook.get_hook("pyramid_attention_broadcast") is not None]


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
@pytest.mark.parametrize("order", ["cache_first", "stg_first"])
def test_matches_reference(family, mode, order):
    pl = _pipeline(family)
    pl.model.enable_cache(_pab(pl.tp.pipe))
    stock = pl.run(STEPS)
    uncached = _pipeline(family).run(STEPS)
    assert not torch.equal(stock, uncached), "PAB never broadcast: widen its ranges"
    ref = pl.reference(mode, STEPS)
    if order == "stg_first":
        pl.model.disable_cache()
        session = stg_ext.apply_stg(pl.tp.pipe, pl.fam.layer, mode)
        pl.model.enable_cache(_pab(pl.tp.pipe))
    else:
        session = stg_ext.apply_stg(pl.tp.pipe, pl.fam.layer, mode)
    with session:
        out = pl.run(STEPS)
    check(out, ref, stock)
    assert torch.equal(pl.run(STEPS), stock), "remove_stg left PAB changed"


@pytest.mark.parametrize("order", ["cache_first", "stg_first"])
def test_broadcast_schedule_counts_the_stock_calls_only(order):
    # HunyuanVideo (one call per step with true CFG off): each attention module's count advances once per step, as
    # without STG, whichever was enabled first.
    pl = _pipeline("hunyuan_video")
    seen = []

    def record(pipe, i, t, kw):
        seen.append(_iterations(pl.model))
        return kw

    if order == "stg_first":
        stg_ext.apply_stg(pl.tp.pipe, 2, "attention")
    pl.model.enable_cache(_pab(pl.tp.pipe))
    if order == "cache_first":
        stg_ext.apply_stg(pl.tp.pipe, 2, "attention")
    pl.run(STEPS, true_cfg_scale=1.0, callback_on_step_end=record)
    assert seen and all(counts and set(counts) == {i + 1} for i, counts in enumerate(seen)), seen


@pytest.mark.parametrize("family", ["easyanimate"])
@pytest.mark.parametrize("order", ["cache_first", "stg_first"])
def test_apply_function_on_a_model_without_enable_cache(family, order):
    # EasyAnimate's transformer has no enable_cache; diffusers' apply_* function hooks it all the same.
    from diffusers.hooks import apply_pyramid_attention_broadcast

    pl = _pipeline(family)
    apply_pyramid_attention_broadcast(pl.model, _pab(pl.tp.pipe))
    stock = pl.run(STEPS)
    assert not torch.equal(stock, _pipeline(family).run(STEPS)), "PAB never broadcast"
    ref = pl.reference("attention", STEPS)
    other = _pipeline(family)  # the same seed: the same weights
    if order == "stg_first":
        session = stg_ext.apply_stg(other.tp.pipe, other.fam.layer, "attention")
        apply_pyramid_attention_broadcast(other.model, _pab(other.tp.pipe))
    else:
        apply_pyramid_attention_broadcast(other.model, _pab(other.tp.pipe))
        session = stg_ext.apply_stg(other.tp.pipe, other.fam.layer, "attention")
    with session:
        out = other.run(STEPS)
    check(out, ref, stock)


# Cosmos (Predict2): its transformer has no enable_cache and, of diffusers' caches, takes only PAB through
# apply_pyramid_attention_broadcast: its block class is not in diffusers' block registry (First Block Cache,
# MagCache), FasterCache fails on its call (IndexError), TaylorSeer needs a cache_context the pipeline never sets,
# and SeaCache hooks Cosmos 3 only.
@pytest.mark.parametrize("mode", ["attention", "residual"])
@pytest.mark.parametrize("order", ["cache_first", "stg_first"])
def test_cosmos_through_the_apply_function(mode, order):
    from diffusers.hooks import apply_pyramid_attention_broadcast

    pl = Pipeline(tiny_pipeline("cosmos", vae=False), FAMILIES["cosmos"])
    apply_pyramid_attention_broadcast(pl.model, _pab(pl.tp.pipe))
    stock = pl.run(STEPS)
    assert not torch.equal(stock, Pipeline(tiny_pipeline("cosmos", vae=False), pl.fam).run(STEPS)), "never broadcast"
    ref = pl.reference(mode, STEPS)
    other = Pipeline(tiny_pipeline("cosmos", vae=False), pl.fam)  # the same seed: the same weights
    if order == "stg_first":
        session = stg_ext.apply_stg(other.tp.pipe, other.fam.layer, mode)
        apply_pyramid_attention_broadcast(other.model, _pab(other.tp.pipe))
    else:
        apply_pyramid_attention_broadcast(other.model, _pab(other.tp.pipe))
        session = stg_ext.apply_stg(other.tp.pipe, other.fam.layer, mode)
    with session:
        out = other.run(STEPS)
    check(out, ref, stock)
    assert torch.equal(other.run(STEPS), stock), "remove_stg left PAB changed"
