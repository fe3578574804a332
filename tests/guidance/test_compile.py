"""STG inside torch.compile (issue 12): the denoiser compiled whole (`model.compile()`, `torch.compile(model)`) or
regionally (`compile_repeated_blocks(fullgraph=True)`, each block compiled where the family has no repeated
blocks). stg_ext adds no graph break (every break under STG has a reason the stock run also has), and once warm
nothing recompiles: further runs with another step count, scale, window and rescale compile no new graph.
Latents equal eager STG (aot_eager: 1e-5 x max|latents|).

Tiny random pipelines (stg_ext.testing.tiny), CPU, fp32, latent output.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

FAMILIES = ["wan", "ltx", "mochi", "hunyuan_video", "cogvideox"]
TOL = 1e-5
# Runs after the warm one: another step count, another scale, a window, rescale.
LATER = [(4, dict(scale=2.0, stop=0.5)), (3, dict(scale=1.0, rescale=0.7))]


pytestmark = [pytest.mark.usefixtures("fresh_dynamo"), pytest.mark.dynamo]


def _run(tp, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pipe(**tp.call_kwargs(steps=steps)).frames


def _compile(model, how):
    if how == "whole":
        model.compile(backend="aot_eager", fullgraph=False)
    elif getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    else:  # each block compiled (Mochi and CogVideoX define no _repeated_blocks; Mochi's attention breaks its
        # graph itself, on a data-dependent nonzero, so not fullgraph)
        for blocks in ("transformer_blocks", "single_transformer_blocks", "blocks"):
            for block in getattr(model, blocks, []):
                block.compile(backend="aot_eager")


def _breaks():
    return dict(counters["graph_break"])


def _graphs():
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("mode", ["attention", "residual"])
@pytest.mark.parametrize("how", ["whole", "regional"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_stg_breaks_nothing_and_does_not_recompile(family, how, mode):
    # One STG installation per compiled model (a fresh dynamo cache): another installation (other hooks) compiles
    # its own variants, which a regionally compiled model would add to the same blocks' cache.
    torch._dynamo.config.recompile_limit = 8  # the default: regional compilation must stay below it
    eager_tp = tiny_pipeline(family, vae=False)
    want = {}
    for mode in (mode,):
        with stg_ext.apply_stg(eager_tp.pipe, 1, mode):
            want[mode] = _run(eager_tp, 3)
        for steps, settings in LATER:
            with stg_ext.apply_stg(eager_tp.pipe, 1, mode, **settings):
                want[mode, steps, tuple(settings.items())] = _run(eager_tp, steps)

    tp = tiny_pipeline(family, vae=False)
    _compile(tp.pipe.transformer, how)
    _run(tp, 3)
    _run(tp, 4)
    stock_breaks = set(_breaks())
    for mode in (mode,):
        stg_ext.apply_stg(tp.pipe, 1, mode)
        got = _run(tp, 3)
        torch.testing.assert_close(got, want[mode], atol=TOL * want[mode].abs().max().item(), rtol=0)
        warm = _graphs()
        for steps, settings in LATER:
            stg_ext.apply_stg(tp.pipe, 1, mode, **settings)
            got = _run(tp, steps)
            ref = want[mode, steps, tuple(settings.items())]
            torch.testing.assert_close(got, ref, atol=TOL * ref.abs().max().item(), rtol=0)
        assert _graphs() == warm, f"{mode}: a warm run compiled {_graphs() - warm} new graph(s)"
        stg_ext.remove_stg(tp.pipe)
        assert set(_breaks()) <= stock_breaks, f"{mode}: breaks stg_ext added: {set(_breaks()) - stock_breaks}"


def test_torch_compile_wrapper_applied_before_and_after_stg():
    tp = tiny_pipeline("wan", vae=False)
    with stg_ext.apply_stg(tp.pipe, 1, "attention", rescale=0.7):
        want = _run(tp, 3)
    # compiled after apply_stg: found when the run starts
    handle = stg_ext.apply_stg(tp.pipe, 1, "attention", rescale=0.7)
    model = tp.pipe.transformer
    tp.pipe.transformer = torch.compile(model, backend="aot_eager")
    got = _run(tp, 3)
    torch.testing.assert_close(got, want, atol=TOL * want.abs().max().item(), rtol=0)
    handle.remove()
    assert "forward" not in vars(model) and not any(hasattr(m, "_stg_ext_session") for m in model.modules())
    stock = _run(tp, 3)
    # applied to the compiled wrapper (the denoiser target)
    with stg_ext.apply_stg(tp.pipe.transformer, 1, "attention", rescale=0.7):
        got = _run(tp, 3)
    torch.testing.assert_close(got, want, atol=TOL * want.abs().max().item(), rtol=0)
    assert not set(_breaks())
    torch.testing.assert_close(_run(tp, 3), stock, atol=0, rtol=0)


def test_per_step_layers_cost_one_graph_per_layer_set():
    tp = tiny_pipeline("wan", vae=False)
    tp.pipe.transformer.compile(backend="aot_eager")
    with stg_ext.apply_stg(tp.pipe, 1, "residual"):
        _run(tp, 4)
    one = _graphs()
    schedule = stg_ext.per_step([1, 2, 1, 2])
    with stg_ext.apply_stg(tp.pipe, schedule, "residual"):
        _run(tp, 4)
        two = _graphs()
        _run(tp, 4)
        assert _graphs() == two
    # a second layer set adds its own stash and replay graphs, nothing per step
    assert two - one <= 2 * 2 + 1  # per layer set a stash and a replay graph, plus the uncond graph
