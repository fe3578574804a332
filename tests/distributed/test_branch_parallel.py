"""Branch parallelism (issue 14): apply_stg(pipe, ..., process_group=group) spreads each step's branches (u, c,
the perturbed passes) over 2 or 3 gloo processes; every rank ends with the same latents (bit for bit), equal to one
process's (fp32, 1e-5 x max|latents|). Wan for separate cond/uncond calls, LTX and Mochi for batched [uncond, cond]
calls; windows, per-step settings, rescale (STG's and the pipeline's own guidance_rescale), CFG off, two perturbed
passes, the strategies "batched" and "naive" on the cond rank, and each placement of the perturbed pass (on the
cond rank, from a stash sent to another rank, in full on another rank). The split and the bytes each rank sends
are checked on the records the drivers keep.

With 4 processes: branch parallel on the "branch" dimension of a (branch=2, ring=1, ulysses=2) device mesh, with
diffusers' Ulysses context parallelism on the "ulysses" dimension (2-D), equal to one process.
"""
from __future__ import annotations

import pytest
import torch

from stg_ext.guidance.parallel import plan
from stg_ext.testing.distributed import run_group
from tests.distributed._workers import STEPS, branch_worker

TOL = 1e-5

WAN = [
    dict(name="wan_attention", family="wan", stg=dict(mode="attention")),
    dict(name="wan_residual_rescale", family="wan", stg=dict(mode="residual", rescale=0.7)),
    dict(name="wan_window", family="wan", stg=dict(mode="attention", start=0.3, stop=0.6)),
    dict(name="wan_per_step", family="wan", stg=dict(mode="attention", scale=[1.0, 0.0, 2.0], rescale=[0.0, 0.7, 0.3],
                                                     per_step_layer=True)),
    dict(name="wan_cfg_off", family="wan", stg=dict(mode="residual"), call=dict(cfg=False)),
    dict(name="wan_stash", family="wan", stg=dict(mode="attention", rescale=0.7), placement="stash"),
    dict(name="wan_full", family="wan", stg=dict(mode="residual"), placement="full"),
    dict(name="wan_two_modes", family="wan", stg=dict(mode=("attention", "residual"), scale=(1.0, 0.5))),
    dict(name="wan22_scale2_1", family="wan22", stg=dict(mode="attention", rescale=0.7),
         call=dict(guidance_scale_2=1.0)),
    dict(name="wan_naive", family="wan", stg=dict(mode="attention", strategy="naive")),
    # Near g = 1 the serial protocol (parallel.SERIAL_BELOW); the deferred one was off by 4.1e-2 x max at 1 + 1e-6.
    dict(name="wan_near_one_1e-6", family="wan", stg=dict(mode="attention", rescale=0.7),
         call=dict(guidance_scale=1 + 1e-6)),
    dict(name="wan_near_one_1e-3", family="wan", stg=dict(mode="residual", rescale=0.7),
         call=dict(guidance_scale=1 + 1e-3)),
    dict(name="wan_near_one_no_rescale", family="wan", stg=dict(mode="attention"), call=dict(guidance_scale=1.1)),
    dict(name="wan_g_1.3", family="wan", stg=dict(mode="attention", rescale=0.7), call=dict(guidance_scale=1.3)),
]
BATCHED = [
    dict(name="ltx_attention", family="ltx", stg=dict(mode="attention")),
    dict(name="ltx_residual_rescale", family="ltx", stg=dict(mode="residual", rescale=0.7)),
    dict(name="ltx_window", family="ltx", stg=dict(mode="residual", start=0.34, stop=1.0)),
    dict(name="ltx_per_step", family="ltx", stg=dict(mode="attention", scale=[0.5, 1.0, 0.0], per_step_layer=True)),
    dict(name="ltx_cfg_off", family="ltx", stg=dict(mode="attention", rescale=0.7), call=dict(cfg=False)),
    dict(name="ltx_guidance_rescale", family="ltx", stg=dict(mode="attention"), call=dict(guidance_rescale=0.7)),
    dict(name="ltx_stash", family="ltx", stg=dict(mode="attention"), placement="stash"),
    dict(name="ltx_full", family="ltx", stg=dict(mode="attention"), placement="full"),
    dict(name="ltx_batched", family="ltx", stg=dict(mode="residual", strategy="batched")),
    dict(name="mochi_attention", family="mochi", stg=dict(mode="attention")),
    dict(name="mochi_residual_rescale", family="mochi", stg=dict(mode="residual", rescale=0.7)),
    dict(name="mochi_two_modes", family="mochi", stg=dict(mode=("attention", "residual"), scale=(1.0, 0.5))),
]
TWO = WAN + BATCHED
THREE = [s for s in TWO if s["name"] in ("wan_attention", "wan_stash", "wan_near_one_1e-6", "wan_two_modes",
                                         "wan_window", "ltx_attention", "ltx_stash", "ltx_guidance_rescale",
                                         "mochi_residual_rescale", "mochi_two_modes")]
MESH = [s for s in TWO if s["name"] in ("wan_attention", "wan_stash", "wan_window", "wan_residual_rescale")]


@pytest.fixture(scope="module")
def two():
    return run_group(branch_worker, 2, TWO, timeout=600)


@pytest.fixture(scope="module")
def three():
    return run_group(branch_worker, 3, THREE, timeout=600)


@pytest.fixture(scope="module")
def mesh():
    return run_group(branch_worker, 4, MESH, "mesh2d", timeout=600)


def _check(results, name):
    ref = results[0][name]["ref"]
    scale = ref.abs().max().item()
    for rank, res in enumerate(results):
        err = (res[name]["out"] - ref).abs().max().item()
        assert err <= TOL * scale, f"{name} rank {rank}: max abs diff {err:.3g} > {TOL} x {scale:.3g}"
        assert torch.equal(res[name]["out"], results[0][name]["out"]), f"{name}: rank {rank} differs from rank 0"
        assert res[name]["left_hooks"] == [], f"{name}: hooks left after remove: {res[name]['left_hooks']}"


@pytest.mark.parametrize("name", [s["name"] for s in TWO])
def test_two_ranks_equal_one_process(two, name):
    _check(two, name)


@pytest.mark.parametrize("name", [s["name"] for s in THREE])
def test_three_ranks_equal_one_process(three, name):
    _check(three, name)


@pytest.mark.parametrize("name", [s["name"] for s in MESH])
def test_branches_by_ulysses_mesh_equals_one_process(mesh, name):
    _check(mesh, name)


LATENT = 1 * 4 * 3 * 8 * 8 * 4  # bytes of one tiny Wan prediction (fp32)


def _active(records):
    return [r for r in records if r[1] != "cond"]


def test_two_rank_split_keeps_prefix_reuse_on_the_cond_rank(two):
    # Separate calls, CFG on: rank 0 computes u, rank 1 c and the perturbed suffix (layer 1 of 3 blocks: 2/3 of a
    # pass); each sends what the other lacks, one prediction one way and two the other, every step.
    r0, r1 = (res["wan_attention"]["records"] for res in two)
    assert [r[2] for r in r0] == [("u",)] * STEPS and [r[2] for r in r1] == [("c", "p0:local")] * STEPS
    assert [r[3] for r in r0] == [1.0] * STEPS and [r[3] for r in r1] == pytest.approx([1 + 2 / 3] * STEPS)
    assert [(r[4], r[5]) for r in r0] == [(LATENT, 2 * LATENT)] * STEPS
    assert [(r[4], r[5]) for r in r1] == [(2 * LATENT, LATENT)] * STEPS


def test_stash_placement_sends_the_block_inputs(two):
    # placement="stash": rank 1 sends block 1's hidden states (48 tokens x 32 channels, fp32) to rank 0, which runs
    # u, then the perturbed suffix from them.
    r0, r1 = (res["wan_stash"]["records"] for res in two)
    stash = 48 * 32 * 4
    assert [r[2] for r in r0] == [("u", "p0:stash")] * STEPS and [r[2] for r in r1] == [("c",)] * STEPS
    assert [(r[4], r[5]) for r in r1] == [(LATENT + stash, 2 * LATENT)] * STEPS
    assert [(r[4], r[5]) for r in r0] == [(2 * LATENT, LATENT + stash)] * STEPS


def test_outside_the_window_only_cfg_branches_are_spread(two):
    r0, r1 = (res["wan_window"]["records"] for res in two)
    assert [r[2] for r in r0] == [("u",)] * STEPS
    assert [r[2] for r in r1] == [("c",), ("c", "p0:local"), ("c",)]


def test_near_one_runs_u_after_the_cond_call(two):
    # |1 - g| < SERIAL_BELOW: the cond call spreads c and the perturbed pass (rank 1 c, rank 0 the full perturbed
    # pass), the uncond call runs u on rank 0 and sends it; each rank sends one prediction per call.
    r0, r1 = (res["wan_near_one_1e-6"]["records"] for res in two)
    assert [r[1:3] for r in r0] == [("cond", ("p0:full",)), ("uncond", ("u",))] * STEPS
    assert [r[1:3] for r in r1] == [("cond", ("c",)), ("uncond", ())] * STEPS
    assert [(r[4], r[5]) for r in r0] == [(LATENT, LATENT), (LATENT, 0)] * STEPS
    assert [(r[4], r[5]) for r in r1] == [(LATENT, LATENT), (0, LATENT)] * STEPS


def test_three_ranks_run_one_pass_each(three):
    tasks = [[r[2] for r in res["wan_attention"]["records"]] for res in three]
    assert tasks == [[("u",)] * STEPS, [("c",)] * STEPS, [("p0:full",)] * STEPS]
    assert all(r[3] == 1.0 for res in three for r in res["wan_attention"]["records"])


def test_plan_balances_the_ranks():
    # sigma = 0.3 (Mochi-like: the suffix after block 34 of 48), the stash ready after 0.7 of a pass.
    assert plan(2, True, 1, 0.3, 0.7).passes(0.3) == [1.0, 1.3]
    assert plan(2, True, 2, 0.3, 0.7).passes(0.3) == [1.3, 1.3]  # the second perturbed pass from the stash
    assert plan(3, True, 1, 0.3, 0.7).passes(0.3) == [1.0, 1.0, 1.0]
    assert plan(2, False, 1, 0.3, 0.7).passes(0.3) == [1.0, 1.0]
    assert [t.name for t in plan(3, True, 0, 1.0, 0.0).tasks[2]] == ["c"]  # an idle rank computes c itself
    assert plan(2, True, 1, 1.0, 0.0, stash_ok=False).passes(1.0) == [1.0, 2.0]  # no prefix reuse (SVD): 1 + 1
