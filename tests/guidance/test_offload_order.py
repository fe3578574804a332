"""Offloading in either order (issue 15, "order never matters silently").

The one check STG makes against offloading is prefix reuse's: when any other hook sits on a block (diffusers' group
offload at block level, caches), the perturbed pass runs every block instead of starting at the perturbed one
(`PerturbedBranch._foreign_block_hooks`). It is made at every call, so offloading enabled after `apply_stg` is seen
at its first call. Why it matters: a block group is onloaded by its first block's hook; a pass that starts inside
the group would find its weights still offloaded on an accelerator.

The tests here run the tiny Wan with offloading enabled before and after apply_stg, in both modes, and compare the
final latents with STG on the same pipeline without offloading (bit for bit: CPU onload and offload devices move
nothing). The check itself is observed through the block-level group hook: its onload leader (block 0) must run in
every pass of the denoiser, also the perturbed one at layer 1 that prefix reuse would start at block 1.

Sequential CPU offload (accelerate's cpu_offload on every module) fails on a CPU-only machine without STG: its
post-forward cannot put a CPU-executed weight back on the meta device. Its test runs on an accelerator only; the
stock failure on CPU is asserted so that a fixed accelerate shows up here.
"""
from __future__ import annotations

import warnings
from typing import Callable, List

import pytest
import torch

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

STEPS = 3
LAYER = 1  # not block 0: prefix reuse would skip block 0, the onload leader of the first group
MODES = ["residual", "attention"]
ORDERS = ["offload_first", "stg_first"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _latents(tp) -> torch.Tensor:
    return _quiet(lambda: tp.pipe(**tp.call_kwargs(steps=STEPS)).frames)


@pytest.fixture(scope="module")
def references():
    """STG's latents on the tiny Wan without offloading, per mode, and the stock latents."""
    tp = _quiet(tiny_pipeline, "wan", vae=False)
    out = {"stock": _latents(tp)}
    for mode in MODES:
        with stg_ext.apply_stg(tp.pipe, LAYER, mode):
            out[mode] = _latents(tp)
    assert not torch.equal(out["residual"], out["stock"]) and not torch.equal(out["attention"], out["stock"])
    return out


def _in_order(order: str, mode: str, enable: Callable[[object], None]):
    tp = _quiet(tiny_pipeline, "wan", vae=False)
    if order == "offload_first":
        enable(tp.pipe)
    session = stg_ext.apply_stg(tp.pipe, LAYER, mode)
    if order == "stg_first":
        enable(tp.pipe)
    return tp, session


def _passes(model) -> List[int]:
    """Counts the denoiser's passes: its patch embedding runs once in each (prefix reuse skips blocks only)."""
    calls = [0]
    model.patch_embedding.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


def _count_group_onloads(block) -> List[int]:
    """Counts the calls of the group offload hook on `block` (its group's onload leader)."""
    registry = block._diffusers_hook
    ref = registry._fn_refs[registry._hook_order.index("group_offloading")]
    original, calls = ref.pre_forward, [0]

    def pre_forward(module, *args, **kwargs):
        calls[0] += 1
        return original(module, *args, **kwargs)
    ref.pre_forward = pre_forward
    return calls


def _group_offload(offload_type: str, **extra):
    def enable(pipe):
        pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                              offload_type=offload_type, **extra)
    return enable


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", MODES)
def test_block_group_offload_every_pass_onloads_its_groups(references, order, mode):
    """Blocks grouped in twos (0-1, 2): the group of blocks 0 and 1 is onloaded by block 0's hook. STG at layer 1
    with group offloading enabled before or after it: block 0's hook runs in every pass (prefix reuse stepped aside,
    found at the first call in the stg_first order), and the latents equal STG's without offloading."""
    tp, session = _in_order(order, mode, _group_offload("block_level", num_blocks_per_group=2))
    model = tp.pipe.transformer
    assert model.blocks[0]._diffusers_hook.get_hook("group_offloading").group.onload_leader is model.blocks[0]
    passes, onloads = _passes(model), _count_group_onloads(model.blocks[0])
    assert torch.equal(_latents(tp), references[mode])
    assert passes[0] == 3 * STEPS  # uncond, cond, perturbed: the perturbed pass ran
    assert onloads[0] == passes[0], "a pass skipped block 0, the onload leader of its group"
    session.remove()
    assert torch.equal(_latents(tp), references["stock"])


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", MODES)
def test_leaf_group_offload(references, order, mode):
    """Leaf-level group offloading hooks the leaf layers, none of the blocks: each leaf onloads itself, prefix reuse
    stays on, and the latents equal STG's without offloading in either order."""
    tp, session = _in_order(order, mode, _group_offload("leaf_level"))
    assert torch.equal(_latents(tp), references[mode])
    session.remove()
    assert torch.equal(_latents(tp), references["stock"])


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", MODES)
def test_model_cpu_offload(references, order, mode):
    """accelerate's model offload (onload device: the CPU) before or after apply_stg, both modes."""
    tp, session = _in_order(order, mode, lambda pipe: pipe.enable_model_cpu_offload(device="cpu"))
    for _ in range(2):  # the pipeline puts new offload hooks on after each call
        assert torch.equal(_latents(tp), references[mode])
    session.remove()
    assert torch.equal(_latents(tp), references["stock"])


def test_sequential_cpu_offload_fails_stock_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("an accelerator is present: the next test runs instead")
    tp = _quiet(tiny_pipeline, "wan", vae=False)
    tp.pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(TypeError, match="invalid combination of arguments"):
        _latents(tp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sequential CPU offload needs an accelerator (see above)")
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", MODES)
def test_sequential_cpu_offload(order, mode):
    """On an accelerator: the latents with sequential offload equal STG's with the whole model on the device
    (within fp32 rounding of a different kernel placement: 1e-5 x max)."""
    ref = _quiet(tiny_pipeline, "wan", vae=False)
    ref.pipe.to("cuda")
    with stg_ext.apply_stg(ref.pipe, LAYER, mode):
        expected = _latents(ref).cpu()
    tp, session = _in_order(order, mode, lambda pipe: pipe.enable_sequential_cpu_offload(device="cuda"))
    got = _latents(tp).cpu()
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    session.remove()
