"""STG with MagCache, SeaCache, TaylorSeer and the text KV cache (issue 15): against the plain reference of
_reference.py, in both orders. Each computes u and c as without STG; the perturbed pass bypasses it."""
from __future__ import annotations

import pytest
import torch
from diffusers import MagCacheConfig, SeaCacheConfig, TaylorSeerCacheConfig, TextKVCacheConfig

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

from ._reference import FAMILIES, Pipeline, check

STEPS = 5


def _mag(family):
    # Ratios of 1 (no calibration for tiny random models) and a wide budget: the stack is skipped after step 1.
    return MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, threshold=0.5, retention_ratio=0.2)


def _sea(family):
    return SeaCacheConfig(threshold=10.0, retention_steps=1, cache_end_steps=1)


def _taylor(family):
    blocks = {"wan": r"blocks\.\d+", "cogvideox": r"transformer_blocks\.\d+", "mochi": r"transformer_blocks\.\d+"}
    return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32,
                                 cache_identifiers=[blocks[family]])


def _text_kv(family):
    return TextKVCacheConfig()


CACHES = {"mag": _mag, "sea": _sea, "taylor": _taylor, "text_kv": _text_kv}
CASES = [("mag", "mochi"), ("mag", "cogvideox"), ("sea", "wan"), ("taylor", "wan"), ("taylor", "cogvideox"),
         ("text_kv", "wan"), ("text_kv", "mochi")]
EXACT = {"text_kv"}  # changes no value on the video denoisers


@pytest.mark.parametrize("cache,family", CASES, ids=[f"{c}-{f}" for c, f in CASES])
@pytest.mark.parametrize("mode", ["attention", "residual"])
@pytest.mark.parametrize("order", ["cache_first", "stg_first"])
def test_matches_reference(cache, family, mode, order):
    pl = Pipeline(tiny_pipeline(family, vae=False), FAMILIES[family])
    config = CACHES[cache]
    pl.model.enable_cache(config(family))
    stock = pl.run(STEPS)
    uncached = Pipeline(tiny_pipeline(family, vae=False), pl.fam).run(STEPS)
    assert torch.equal(stock, uncached) == (cache in EXACT), "the cache should change the run exactly if it is not exact"
    ref = pl.reference(mode, STEPS)
    if order == "stg_first":
        pl.model.disable_cache()
        session = stg_ext.apply_stg(pl.tp.pipe, pl.fam.layer, mode)
        pl.model.enable_cache(config(family))
    else:
        session = stg_ext.apply_stg(pl.tp.pipe, pl.fam.layer, mode)
    with session:
        out = pl.run(STEPS)
    check(out, ref, stock)
    assert torch.equal(pl.run(STEPS), stock), "remove_stg left the cache changed"
