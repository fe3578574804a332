"""FasterCache enabled after apply_stg on a bare denoiser driven by a custom loop (issue 15): session.set_step(0, n)
moves STG's hook outside FasterCache's before the run's first call, so the run equals the cache-first order bit for
bit; without set_step the first call (FasterCache's first iteration: both halves) runs inside it, and the hook moves
out when that call returns."""
from __future__ import annotations


import torch
from diffusers import FasterCacheConfig

import stg_ext
from stg_ext.guidance.caches import outside
from stg_ext.guidance.session import GUIDANCE_HOOK
from stg_ext.testing.tiny import tiny_pipeline

STEPS = 3
G = 4.5


def _faster() -> FasterCacheConfig:
    wide = (-1, 10 ** 6)
    return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=wide,
                             unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=wide,
                             attention_weight_callback=lambda _: 0.5, tensor_format="BCFHW",
                             current_timestep_callback=lambda: 500)


def _model_and_call():
    """The tiny Mochi transformer and the keyword arguments of the pipeline's first [uncond, cond] call."""
    tp = tiny_pipeline("mochi", vae=False)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("kwargs", {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    handle = tp.pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    tp.pipe(**tp.call_kwargs(steps=2))
    handle.remove()
    return tp.pipe.transformer, seen["kwargs"]


def _loop(model, kwargs, session, set_step: bool):
    """The outputs of STEPS calls, and whether a cache hook was still outside STG's after the first."""
    outs, inside_after_first = [], None
    with torch.no_grad():
        for i in range(STEPS):
            if set_step:
                session.set_step(i, STEPS)
            outs.append(model(**kwargs)[0])
            if i == 0:
                inside_after_first = bool(outside(model, GUIDANCE_HOOK))
    return outs, inside_after_first


def test_set_step_arranges_before_the_first_call():
    model, kwargs = _model_and_call()
    model.enable_cache(_faster())
    first = stg_ext.apply_stg(model, 1, "attention", cfg_scale=G)
    expected = _loop(model, kwargs, first, set_step=True)
    assert not torch.equal(expected[0][1], expected[0][0]), "FasterCache changed nothing between calls"
    first.remove()
    model.disable_cache()

    later = stg_ext.apply_stg(model, 1, "attention", cfg_scale=G)
    model.enable_cache(_faster())
    assert outside(model, GUIDANCE_HOOK)
    got, inside = _loop(model, kwargs, later, set_step=True)
    later.remove()
    assert not inside and all(torch.equal(a, b) for a, b in zip(got, expected[0]))


def test_without_set_step_the_hook_moves_out_after_the_first_call():
    model, kwargs = _model_and_call()
    model.enable_cache(_faster())
    first = stg_ext.apply_stg(model, 1, "attention", cfg_scale=G)
    expected, _ = _loop(model, kwargs, first, set_step=False)
    first.remove()
    model.disable_cache()

    later = stg_ext.apply_stg(model, 1, "attention", cfg_scale=G)
    model.enable_cache(_faster())
    got, inside = _loop(model, kwargs, later, set_step=False)
    later.remove()
    # The first call (both halves at FasterCache's first iteration) is the same; the hook is outside after it.
    assert torch.equal(got[0], expected[0]) and not inside
    assert all(torch.isfinite(x).all() and x.shape == expected[0].shape for x in got[1:])
