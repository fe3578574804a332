"""STG under diffusers' context parallelism (issue 14): `transformer.enable_parallelism(config=
ContextParallelConfig(ulysses_degree=2))` on 2 gloo processes, on every tiny family with a `_cp_plan` that apply_stg
drives, both orders of apply_stg / enable_parallelism, both modes, prefix reuse on (strategy="sequential"): every
rank's final latents equal one process's (fp32, 1e-5 x max|latents|), and the perturbed pass still runs only the
blocks from the perturbed one on.

Found (diffusers 0.42.1): the stock LTX pipelines do not run under Ulysses at all on these tiny models (text-mask
broadcast in the Ulysses attention for LTX and LTX-2; a per-token timestep not split for LTX image-to-video); the test
records that failure instead of comparing STG there. Ring attention needs an attention backend that returns the
log-sum-exp (flash, sage, cuDNN/efficient SDPA on a GPU); native CPU SDPA does not, so only Ulysses runs here.
"""
from __future__ import annotations

import pytest
import torch

from stg_ext.testing.distributed import run_group
from tests.distributed._workers import CP_FAMILIES, STEPS, cp_worker

TOL = 1e-5
#: The stock pipeline fails under Ulysses in diffusers 0.42.1 (see the module docstring), with this error text.
DIFFUSERS_FAILS = {"ltx": "doesn't match the broadcast shape", "ltx_i2v": "must match the size of tensor",
                   "ltx2": "doesn't match the broadcast shape"}


@pytest.fixture(scope="module")
def runs():
    return run_group(cp_worker, 2, CP_FAMILIES, timeout=600)


def _check(results, key):
    ref = results[0][key]["ref"]
    scale = ref.abs().max().item()
    for rank, res in enumerate(results):
        err = (res[key]["out"] - ref).abs().max().item()
        assert err <= TOL * scale, f"{key} rank {rank}: max abs diff {err:.3g} > {TOL} x {scale:.3g}"
        assert torch.equal(res[key]["out"], results[0][key]["out"]), f"{key}: ranks differ"


@pytest.mark.parametrize("family", CP_FAMILIES)
def test_stock_pipeline_under_ulysses(runs, family):
    stock = runs[0][(family, "stock")]
    if family in DIFFUSERS_FAILS:
        assert "error" in stock and DIFFUSERS_FAILS[family] in stock["error"], \
            f"{family}: diffusers' Ulysses now runs this pipeline: compare STG there (drop it from DIFFUSERS_FAILS)"
        return
    _check(runs, (family, "stock"))


@pytest.mark.parametrize("order", ["stg_first", "cp_first"])
@pytest.mark.parametrize("mode", ["attention", "residual"])
@pytest.mark.parametrize("family", CP_FAMILIES)
def test_stg_under_ulysses_equals_one_process(runs, family, mode, order):
    if family in DIFFUSERS_FAILS:
        pytest.skip(f"the stock {family} pipeline fails under diffusers' Ulysses (test_stock_pipeline_under_ulysses)")
    _check(runs, (family, mode, order))


@pytest.mark.parametrize("order", ["stg_first", "cp_first"])
@pytest.mark.parametrize("mode", ["attention", "residual"])
def test_prefix_reuse_stays_on_under_ulysses(runs, mode, order):
    # Wan, 3 blocks, layer 1, CFG on: per step the cond and uncond passes run every block; the perturbed pass only
    # the blocks from the first computed one on (STG-R skips block 1 itself). diffusers' context-parallel hooks on
    # the blocks are stateless, so prefix reuse does not step aside for them.
    first = 2 if mode == "residual" else 1
    for res in runs:
        counts = res[("wan", mode, order)]["counts"]
        assert counts == {k: STEPS * (2 + (k >= first)) for k in range(3)}
