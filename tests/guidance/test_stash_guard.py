"""The prefix stash's guard (issue 15): a stashed tensor modified in place before its replay is an error.

Prefix reuse keeps references to what the first perturbed block received in the stock pass; a later block that
modifies one of those tensors in place (here: a forward pre-hook on a later block scaling the shared conditioning
tensor in place, as a block that updates its input in place would) makes the replay start from values the stock
pass never had. The guard must raise, name the block, and point at strategy='naive', which must then run.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import stg_ext
from stg_ext.guidance.stash_guard import StashModifiedError, StashVersions
from stg_ext.testing.tiny import tiny_pipeline
from stg_ext.weak.adapters.base import positional_names


def _latents(tp, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pipe(**tp.call_kwargs(**{"steps": 2, **overrides})).frames


def _modifies_in_place(block, name: str):
    """A forward pre-hook that makes `block` scale its argument `name` in place (a block modifying its input)."""
    position = positional_names(block).index(name)

    def pre_hook(module, args, kwargs):
        value = kwargs[name] if name in kwargs else args[position]
        value.mul_(0.5)
        return None

    return block.register_forward_pre_hook(pre_hook, with_kwargs=True)


# (family, blocks attribute, the shared argument a later block modifies in place): Wan makes separate calls (the
# stash holds the tensors themselves), Mochi one [uncond, cond] call (the stash holds views of the cond rows).
CASES = [("wan", "blocks", "encoder_hidden_states"), ("mochi", "transformer_blocks", "temb")]


@pytest.mark.parametrize("mode", ["residual", "attention"])
@pytest.mark.parametrize("family,blocks,name", CASES)
def test_in_place_modification_after_the_stash_raises(family, blocks, name, mode):
    tp = tiny_pipeline(family, vae=False)
    later = getattr(tp.pipe.transformer, blocks)[2]
    handle = _modifies_in_place(later, name)
    try:
        with stg_ext.apply_stg(tp.pipe, 1, mode, scale=1.0):
            with pytest.raises(StashModifiedError, match=r"block 1 .*modified in place.*strategy='naive'"):
                _latents(tp)
        # The full third pass keeps no stash: the same model runs.
        with stg_ext.apply_stg(tp.pipe, 1, mode, scale=1.0, strategy="naive"):
            out = _latents(tp)
        assert torch.isfinite(out).all()
    finally:
        handle.remove()


def test_modification_before_the_stash_is_not_an_error():
    """An in-place change before the first perturbed block receives its inputs is part of what the stock pass
    computes and the stash holds: sequential equals naive."""
    tp = tiny_pipeline("wan", vae=False)
    earlier = tp.pipe.transformer.blocks[0]
    handle = _modifies_in_place(earlier, "encoder_hidden_states")
    try:
        out = {}
        for strategy in ("naive", "sequential"):
            with stg_ext.apply_stg(tp.pipe, 1, "residual", scale=1.0, strategy=strategy):
                out[strategy] = _latents(tp)
    finally:
        handle.remove()
    scale = out["naive"].abs().max().item()
    assert (out["sequential"] - out["naive"]).abs().max().item() <= 1e-5 * scale


def test_versions_of_views_and_nested_arguments():
    base = torch.zeros(4, 3)
    rotary = (torch.ones(2), torch.ones(2))
    stash = ((base[2:],), {"rotary": rotary, "scale": 1.0})
    versions = StashVersions.take(stash)
    versions.check(0)  # unchanged: no error
    base[0].add_(1.0)  # a row outside the view: views share the base's version counter, so this counts too
    with pytest.raises(StashModifiedError, match="argument 0"):
        versions.check(0)
    versions = StashVersions.take(stash)
    rotary[1].add_(1.0)
    with pytest.raises(StashModifiedError, match="'rotary'"):
        versions.check(3)
    with torch.inference_mode():  # inference tensors have no version counter: skipped, not an error
        StashVersions.take(((torch.zeros(2),), {})).check(0)
