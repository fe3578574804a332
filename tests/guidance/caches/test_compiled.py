"""STG with a diffusers cache on a compiled denoiser (issue 15): the latents equal the eager STG + cache run.

Compiled whole (`torch.compile(transformer)`, assigned to the pipeline, or `transformer.compile()`) or regionally
(`compile_repeated_blocks`: Wan and LTX define `_repeated_blocks`), with the backend aot_eager; the compile before or
after apply_stg, the cache enabled before or after it. Regional compilation runs with fullgraph=False: with First Block
Cache or Pyramid Attention Broadcast on its blocks, `compile_repeated_blocks(fullgraph=True)` fails without STG too
(FBC's block hook is a `torch.compiler.disable`d call / an unsupported hasattr, PAB's timestep range test a
data-dependent branch). FasterCache runs on CogVideoX and Mochi (compiled whole): without STG it fails on the
separate-call Wan and on LTX.

Tolerance 1e-5 x max|latents| (fp32), as tests/guidance/test_compile.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import FirstBlockCacheConfig
from torch._dynamo.utils import counters

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

from ._reference import FAMILIES
from .test_faster_cache import _faster
from .test_pyramid_attention_broadcast import _pab

STEPS = 4
TOL = 1e-5


# (pipe, family) -> the cache's config
CACHES = {"fbc": lambda pipe, family: FirstBlockCacheConfig(threshold=0.3), "pab": lambda pipe, family: _pab(pipe),
          "faster": lambda pipe, family: _faster(pipe, FAMILIES[family])}
# (family, cache, how, mode, order): order says what comes after apply_stg ("compile_last", "cache_last") or
# that both come before it ("both_first").
CASES = [("wan", "fbc", "wrapper", "attention", "both_first"), ("wan", "fbc", "regional", "residual", "compile_last"),
         ("wan", "pab", "regional", "attention", "cache_last"), ("wan", "pab", "method", "residual", "both_first"),
         ("ltx", "pab", "wrapper", "residual", "cache_last"), ("ltx", "fbc", "regional", "attention", "both_first"),
         ("ltx", "fbc", "method", "residual", "compile_last"),
         ("cogvideox", "faster", "wrapper", "attention", "both_first"),
         ("mochi", "faster", "method", "residual", "cache_last")]


pytestmark = [pytest.mark.usefixtures("fresh_dynamo"), pytest.mark.dynamo]


def _run(tp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pipe(**tp.call_kwargs(steps=STEPS)).frames


def _compile(pipe, how):
    model = pipe.transformer
    if how == "wrapper":
        pipe.transformer = torch.compile(model, backend="aot_eager")
    elif how == "method":
        model.compile(backend="aot_eager")
    else:
        model.compile_repeated_blocks(backend="aot_eager", fullgraph=False)


@pytest.mark.parametrize("family,cache,how,mode,order", CASES, ids=["-".join(c) for c in CASES])
def test_compiled_stg_with_cache_equals_eager(family, cache, how, mode, order):
    eager = tiny_pipeline(family, vae=False)
    uncached = _run(eager)
    eager.pipe.transformer.enable_cache(CACHES[cache](eager.pipe, family))
    assert not torch.equal(_run(eager), uncached), "the cache never changed a value: widen its settings"
    with stg_ext.apply_stg(eager.pipe, 1, mode):
        want = _run(eager)

    tp = tiny_pipeline(family, vae=False)
    if order != "compile_last":
        _compile(tp.pipe, how)
    if order != "cache_last":
        tp.pipe.transformer.enable_cache(CACHES[cache](tp.pipe, family))
    session = stg_ext.apply_stg(tp.pipe, 1, mode)
    if order == "compile_last":
        _compile(tp.pipe, how)
    if order == "cache_last":
        tp.pipe.transformer.enable_cache(CACHES[cache](tp.pipe, family))
    got = _run(tp)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert (got - want).abs().max() <= TOL * want.abs().max()
    session.remove()
