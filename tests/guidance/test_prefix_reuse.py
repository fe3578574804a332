"""Prefix reuse (issue 5, STG_SPEC section 5): the perturbed branch starts at the first perturbed block from the cond
pass's activations, and equals the naive full third pass.

- Exact: final latents of strategy="sequential" equal strategy="naive" (fp32: max abs diff <= 1e-5 x max|latents|),
  every tiny family, both modes, a layer in the middle (HunyuanVideo: a single-stream layer).
- Cheap: in one guided call, the blocks before the first perturbed block run once (the stock pass only), the ones
  after it twice; STG-R's skipped block runs once.
"""
from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

import stg_ext
from stg_ext.weak.adapters import get_adapter
from stg_ext.testing.tiny import FAMILIES, tiny_pipeline

TOL = 1e-5
# A middle layer of each tiny denoiser (hunyuan_video: 2 dual + 2 single blocks, index 3 is single-stream).
LAYER = {"hunyuan_video": 3, "svd": 7, "hunyuan_video15": 1}
SKIP = {"ltx2": "LTX-2 pipelines run their own STG (apply_stg refuses them)",
        "hunyuan_video15": "guider-based pipeline"}


def _latents(tp, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pipe(**tp.call_kwargs(**{"steps": 2, **overrides})).frames


@pytest.mark.parametrize("mode", ["residual", "attention"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in SKIP])
def test_strategies_equal_naive(family, mode):
    tp = tiny_pipeline(family, vae=False)
    layer = LAYER.get(family, 1)
    out = {}
    for strategy in ("naive", "sequential", "batched"):
        with stg_ext.apply_stg(tp.pipe, layer, mode, scale=1.0, rescale=0.7, strategy=strategy):
            out[strategy] = _latents(tp)
    scale = out["naive"].abs().max().item()
    for strategy in ("sequential", "batched"):
        err = (out[strategy] - out["naive"]).abs().max().item()
        assert err <= TOL * scale, f"{family} {mode} {strategy}: max abs diff {err:.3g} > {TOL} x {scale:.3g}"


def _block_runs(model):
    """Counts, per block (execution order), how often its body runs: a block that returns at once never calls its
    first child module."""
    adapter = get_adapter(model)
    blocks = [m for lay in adapter.layers(model) for m in lay.modules]
    counts = Counter()
    handles = [next(block.children()).register_forward_pre_hook(lambda *_, k=k: counts.update([k]))
               for k, block in enumerate(blocks)]
    return blocks, counts, handles


@pytest.mark.parametrize("mode", ["residual", "attention"])
@pytest.mark.parametrize("family,layer", [("wan", 1), ("mochi", 2), ("hunyuan_video", 3), ("hunyuan_video", 1),
                                          ("ltx", 1)])
def test_blocks_before_the_perturbed_one_run_once(family, layer, mode):
    tp = tiny_pipeline(family, vae=False)
    model = tp.pipe.transformer
    blocks, counts, handles = _block_runs(model)
    try:
        # Two steps with CFG off, STG at the first only: two stock passes and one perturbed pass.
        with stg_ext.apply_stg(tp.pipe, layer, mode, scale=1.0, stop=0.5):
            _latents(tp, cfg=False)
    finally:
        for h in handles:
            h.remove()
    first_computed = layer + 1 if mode == "residual" else layer
    assert dict(counts) == {k: 2 + (k >= first_computed) for k in range(len(blocks))}


def test_naive_runs_the_full_third_pass():
    tp = tiny_pipeline("wan", vae=False)
    blocks, counts, handles = _block_runs(tp.pipe.transformer)
    try:
        with stg_ext.apply_stg(tp.pipe, 1, "attention", strategy="naive", stop=0.5):
            _latents(tp, cfg=False)
    finally:
        for h in handles:
            h.remove()
    assert dict(counts) == {k: 3 for k in range(len(blocks))}


def test_unknown_strategy_names_the_valid_ones():
    tp = tiny_pipeline("wan", vae=False)
    with pytest.raises(ValueError, match="sequential"):
        stg_ext.apply_stg(tp.pipe, 1, "attention", strategy="fastest")


@pytest.mark.parametrize("mode", ["residual", "attention"])
@pytest.mark.parametrize("family,layer,cfg,rows", [("mochi", 2, True, (2, 3)), ("wan", 1, True, (1, 2)),
                                                   ("hunyuan_video", 3, False, (1, 2))])
def test_batched_strategy_joins_the_perturbed_rows(family, layer, cfg, rows, mode):
    """strategy="batched": from the first perturbed block on, the stock call carries the perturbed samples too
    (Mochi: [u, c] + p; Wan's cond call and HunyuanVideo without CFG: c + p); no block runs a second time."""
    tp = tiny_pipeline(family, vae=False)
    model = tp.pipe.transformer
    blocks = [m for lay in get_adapter(model).layers(model) for m in lay.modules]
    seen = {k: [] for k in range(len(blocks))}
    def rows_of(args, kwargs):
        first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        return first.shape[0]

    handles = [next(block.children()).register_forward_pre_hook(
        lambda mod, args, kwargs, k=k: seen[k].append(rows_of(args, kwargs)), with_kwargs=True)
        for k, block in enumerate(blocks)]
    try:
        with stg_ext.apply_stg(tp.pipe, layer, mode, scale=1.0, stop=0.5, strategy="batched"):
            _latents(tp, cfg=cfg)
    finally:
        for h in handles:
            h.remove()
    stock, joined = rows
    for k in range(len(blocks)):
        calls = seen[k]
        first = joined if k >= layer else stock
        # step 0 (STG) then step 1 (stock); with separate calls, each step also has an uncond call of `stock` rows
        expected = [first, stock] if not (cfg and family == "wan") else [first, stock, stock, stock]
        if mode == "residual" and k == layer:
            expected[0] = stock  # STG-R: the perturbed rows skip this block's body
        assert calls == expected, (k, calls)


@pytest.mark.parametrize("family", ["mochi", "wan", "hunyuan_video"])
def test_strategies_with_two_videos_per_call(family):
    """Batch 2 per branch (two prompts): the cond half of [u0, u1, c0, c1] is two rows."""
    tp = tiny_pipeline(family, vae=False)

    def two_prompts():
        kw = tp.call_kwargs(steps=2)
        for k, v in list(kw.items()):
            if isinstance(v, torch.Tensor) and ("embeds" in k or "mask" in k):
                kw[k] = torch.cat([v, v.flip(-1) if v.is_floating_point() else v])
        return kw

    out = {}
    for strategy in ("naive", "sequential", "batched"):
        with stg_ext.apply_stg(tp.pipe, 1, "attention", scale=1.0, rescale=0.7, strategy=strategy):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[strategy] = tp.pipe(**two_prompts()).frames
    assert out["naive"].shape[0] == 2
    scale = out["naive"].abs().max().item()
    for strategy in ("sequential", "batched"):
        assert (out[strategy] - out["naive"]).abs().max().item() <= TOL * scale
