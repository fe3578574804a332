"""What the distributed tests run in each process (spawned by stg_ext.testing.distributed.run_group): every scenario
in one process group, so that the ~10-30 s of starting a process and importing diffusers is paid once per group.

A scenario is (name, family, apply_stg keywords, call overrides, placement, steps). Each process computes the
single-process reference itself (no group) and the run under test, and returns both final latents."""
from __future__ import annotations

import traceback
import warnings
from collections import Counter
from typing import Any, Dict, List

import torch

STEPS = 3

# --- context parallel (diffusers' enable_parallelism, Ulysses) ---------------------------------------------------

#: Tiny families with a `_cp_plan` that apply_stg drives (LTX-2 runs its own STG: apply_stg refuses it).
CP_FAMILIES = ("wan", "wan22", "ltx", "ltx_i2v", "ltx2")


def _quiet():
    warnings.simplefilter("ignore")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()


def _latents(tp, **overrides):
    return tp.pipe(**tp.call_kwargs(**{"steps": STEPS, **overrides})).frames


def _enable_cp(tp, degree: int, mesh=None):
    from diffusers import ContextParallelConfig

    for attr in tp.denoiser_attrs:
        config = ContextParallelConfig(ulysses_degree=degree, mesh=mesh)
        getattr(tp.pipe, attr).enable_parallelism(config=config)


def _block_counter(model):
    """Counts how often each block's body runs (its first child module is called)."""
    from stg_ext.weak.adapters import get_adapter

    blocks = [m for lay in get_adapter(model).layers(model) for m in lay.modules]
    counts = Counter()
    handles = [next(block.children()).register_forward_pre_hook(lambda *_, k=k: counts.update([k]))
               for k, block in enumerate(blocks)]
    return counts, handles


def cp_worker(rank: int, world: int, families) -> Dict[str, Any]:
    """STG (layer 1, rescale 0.7, strategy "sequential") with Ulysses over the whole group, both orders, both modes;
    plus the stock pipeline under Ulysses (to tell diffusers' own limits from STG's)."""
    _quiet()
    import stg_ext
    from stg_ext.testing.tiny import tiny_pipeline

    results: Dict[str, Any] = {}
    for family in families:
        tp = tiny_pipeline(family, vae=False)
        stock_ref = _latents(tp)
        tp = tiny_pipeline(family, vae=False)
        try:
            _enable_cp(tp, world)
            results[(family, "stock")] = dict(out=_latents(tp), ref=stock_ref)
        except Exception:  # noqa: BLE001 - diffusers' own failure, reported
            results[(family, "stock")] = dict(error=traceback.format_exc(limit=-3))
            continue
        for mode in ("attention", "residual"):
            tp = tiny_pipeline(family, vae=False)
            with stg_ext.apply_stg(tp.pipe, 1, mode, rescale=0.7):
                ref = _latents(tp)
            for order in ("stg_first", "cp_first"):
                tp = tiny_pipeline(family, vae=False)
                if order == "cp_first":
                    _enable_cp(tp, world)
                handle = stg_ext.apply_stg(tp.pipe, 1, mode, rescale=0.7)
                if order == "stg_first":
                    _enable_cp(tp, world)
                model = getattr(tp.pipe, tp.denoiser_attrs[0])
                counts, hooks = _block_counter(model)
                try:
                    out = _latents(tp)
                finally:
                    for h in hooks:
                        h.remove()
                    handle.remove()
                results[(family, mode, order)] = dict(out=out, ref=ref, counts=dict(counts))
    return results


# --- branch parallel ------------------------------------------------------------------------------------------

def _scenario_kwargs(tp, spec: Dict[str, Any]) -> Dict[str, Any]:
    kw = dict(spec.get("stg", {}))
    layer = kw.pop("layer", 1)
    if kw.pop("per_step_layer", False):
        import stg_ext

        layer = stg_ext.per_step([0, 1, 2][:STEPS])
    return dict(layer=layer, **kw)


def branch_worker(rank: int, world: int, scenarios: List[Dict[str, Any]], group_kind: str = "world"
                  ) -> Dict[str, Any]:
    """Each scenario: the single-process STG latents, then the same with process_group= (the whole world, or with
    group_kind="mesh2d" the "branch" dimension of a (branch, ring=1, ulysses) mesh with Ulysses on the last)."""
    _quiet()
    import torch.distributed as dist

    import stg_ext
    from stg_ext.testing.tiny import tiny_pipeline

    group, mesh = None, None
    if group_kind == "world":
        group = dist.group.WORLD
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world // 2, 1, 2), mesh_dim_names=("branch", "ring", "ulysses"))
        group = mesh.get_group("branch")
    results: Dict[str, Any] = {}
    for spec in scenarios:
        name, family = spec["name"], spec["family"]
        call = spec.get("call", {})
        tp = tiny_pipeline(family, vae=False)
        kw = _scenario_kwargs(tp, spec)
        with stg_ext.apply_stg(tp.pipe, **kw):
            ref = _latents(tp, **call)
        tp = tiny_pipeline(family, vae=False)
        if mesh is not None:
            _enable_cp(tp, 2, mesh=mesh)
        handle = stg_ext.apply_stg(tp.pipe, **kw, process_group=group, branch_placement=spec.get("placement", "auto"))
        try:
            out = _latents(tp, **call)
            records = [(r.step, r.role, r.tasks, r.passes, r.sent_bytes, r.received_bytes)
                       for r in handle.branch_group.records]
        finally:
            handle.remove()
        stock_hooks = sorted(h for m in tp.pipe.transformer.modules()
                             for h in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}) if "stg_ext" in h)
        results[name] = dict(out=out, ref=ref, records=records, left_hooks=stock_hooks)
    return results


# --- jobs across processes (stg_ext/cli/distributed_jobs.py) ----------------------------------------------------

def jobs_worker(rank: int, world: int, n_jobs: int) -> Dict[str, Any]:
    from stg_ext.cli.distributed_jobs import JobGroup

    group = JobGroup()  # joins the group run_group made (not owned: run_group destroys it)
    mine = group.mine(list(range(n_jobs)))
    rows = group.gather((i, dict(job=job, rank=rank)) for i, job in mine)
    return dict(mine=[i for i, _ in mine], rows=rows, distributed=group.distributed, owned=group.owned)
