"""process_group= in one process (a gloo group of 1): what apply_stg refuses, and a group of one rank equal to no
group."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _latents(tp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pipe(**tp.call_kwargs(steps=2)).frames


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_a_group_of_one_equals_no_group(group, family):
    tp = tiny_pipeline(family, vae=False)
    with stg_ext.apply_stg(tp.pipe, 1, "attention", rescale=0.7):
        ref = _latents(tp)
    with stg_ext.apply_stg(tp.pipe, 1, "attention", rescale=0.7, process_group=group) as handle:
        out = _latents(tp)
        assert {r.tasks for r in handle.branch_group.records} == {("u", "c", "p0:local")}
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_cosmos_is_refused(group):
    tp = tiny_pipeline("cosmos", vae=False)
    with pytest.raises(NotImplementedError, match="transforms the cond prediction"):
        stg_ext.apply_stg(tp.pipe, 1, "attention", process_group=group)
    assert not any("stg_ext" in name for m in tp.pipe.transformer.modules()
                   for name in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}))


def test_guider_pipelines_are_refused(group):
    tp = tiny_pipeline("hunyuan_video15", vae=False)
    with pytest.raises(NotImplementedError, match="guider"):
        stg_ext.apply_stg(tp.pipe, 1, "attention", process_group=group)


def test_unknown_placement(group):
    tp = tiny_pipeline("wan", vae=False)
    with pytest.raises(ValueError, match="placement"):
        stg_ext.apply_stg(tp.pipe, 1, "attention", process_group=group, branch_placement="nowhere")
