"""Order never matters (issue 15): STG then the cache, or the cache then STG, give the same latents bit for bit."""
from __future__ import annotations

import pytest
import torch
from diffusers import FirstBlockCacheConfig

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

from ._reference import FAMILIES, Pipeline
from .test_pyramid_attention_broadcast import _pab
from .test_step_caches import STEPS, _mag, _sea, _taylor

CONFIGS = {
    "pab": lambda pl: _pab(pl.tp.pipe),
    "fbc": lambda pl: FirstBlockCacheConfig(threshold=0.3),
    "mag": lambda pl: _mag(pl.fam.name),
    "sea": lambda pl: _sea(pl.fam.name),
    "taylor": lambda pl: _taylor(pl.fam.name),
}
CASES = [("pab", "cogvideox", "attention"), ("pab", "hunyuan_video", "attention"), ("fbc", "wan", "residual"),
         ("fbc", "mochi", "attention"), ("mag", "mochi", "residual"), ("sea", "wan", "attention"),
         ("taylor", "cogvideox", "residual")]


@pytest.mark.parametrize("cache,family,mode", CASES, ids=["-".join(c) for c in CASES])
def test_both_orders_agree_bit_for_bit(cache, family, mode):
    outs = []
    for order in ("cache_first", "stg_first"):
        pl = Pipeline(tiny_pipeline(family, vae=False), FAMILIES[family])
        if order == "stg_first":
            stg_ext.apply_stg(pl.tp.pipe, pl.fam.layer, mode, rescale=0.5)
        pl.model.enable_cache(CONFIGS[cache](pl))
        if order == "cache_first":
            stg_ext.apply_stg(pl.tp.pipe, pl.fam.layer, mode, rescale=0.5)
        outs.append(pl.run(STEPS))
    assert torch.equal(*outs)
