"""STG with First Block Cache (issue 15): against the plain reference of _reference.py, in both orders.

FBC computes u and c as without STG; the perturbed pass bypasses it, so p is the uncached weak model's on every
step, and STG-R may skip FBC's first or last block (was: refused with FBC first, silently wrong with FBC after)."""
from __future__ import annotations

import pytest
import torch
from diffusers import FirstBlockCacheConfig

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

from ._reference import FAMILIES, Pipeline, check

STEPS = 4
THRESHOLD = 0.3  # high enough that the tiny models reuse the residual on some calls
CASES = [("wan", "attention", 1), ("wan", "residual", 0), ("wan", "residual", 2), ("cogvideox", "attention", 1),
         ("cogvideox", "residual", 0), ("mochi", "residual", -1), ("hunyuan_video", "attention", 2)]


def _pipeline(family: str) -> Pipeline:
    return Pipeline(tiny_pipeline(family, vae=False), FAMILIES[family])


@pytest.mark.parametrize("family,mode,layer", CASES, ids=[f"{f}-{m}-{i}" for f, m, i in CASES])
@pytest.mark.parametrize("order", ["cache_first", "stg_first"])
def test_matches_reference(family, mode, layer, order):
    pl = _pipeline(family)
    pl.model.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
    stock = pl.run(STEPS)
    assert not torch.equal(stock, Pipeline(tiny_pipeline(family, vae=False), pl.fam).run(STEPS)), "never cached"
    ref = pl.reference(mode, STEPS, layer=layer)
    if order == "stg_first":
        pl.model.disable_cache()
        session = stg_ext.apply_stg(pl.tp.pipe, layer, mode)
        pl.model.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
    else:
        session = stg_ext.apply_stg(pl.tp.pipe, layer, mode)
    with session:
        out = pl.run(STEPS)
    check(out, ref, stock)
    assert torch.equal(pl.run(STEPS), stock), "remove_stg left FBC changed"


def test_the_weak_model_alone_still_refuses_fbc_boundary_blocks():
    # Without guidance the weak model runs through the cache, whose state lives in the first and last block's hooks.
    pl = _pipeline("wan")
    pl.model.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
    with pytest.raises(ValueError, match="First Block Cache"):
        stg_ext.weak_model(pl.model, 0, "residual")
