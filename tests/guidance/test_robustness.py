"""Edge cases of the pipeline patch found in review: interrupted calls, subclasses, shared denoisers, scale-1 CFG."""
from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import WanPipeline

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline


def _run(pipe, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(**kw).frames


def test_an_interrupted_cond_call_does_not_swap_the_next_runs_roles():
    # Cosmos sets no cache_context: its cond and uncond calls are told apart by order.
    tp = tiny_pipeline("cosmos", vae=False)
    settings = dict(layer=1, mode="residual", scale=1.0, rescale=0.5)
    with stg_ext.apply_stg(tp.pipe, **settings):
        expected = _run(tp.pipe, tp.call_kwargs(steps=2))
    with stg_ext.apply_stg(tp.pipe, **settings):
        def interrupt(module, args):
            raise KeyboardInterrupt
        handle = tp.pipe.transformer.transformer_blocks[2].register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            _run(tp.pipe, tp.call_kwargs(steps=2))
        handle.remove()
        assert torch.equal(_run(tp.pipe, tp.call_kwargs(steps=2)), expected)


def test_scale_one_expert_with_rescale():
    # Wan 2.2 with guidance_scale_2=1: the low-noise expert's CFG line is u + 1 (c' - u) = c'.
    tp = tiny_pipeline("wan22", vae=False)
    with stg_ext.apply_stg(tp.pipe, 1, "residual", scale=1.0, rescale=0.7):
        out = _run(tp.pipe, tp.call_kwargs(steps=4, guidance_scale_2=1.0))
    assert torch.isfinite(out).all()


def test_a_subclass_that_wraps_call_is_guided():
    class MyWan(WanPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    tp = tiny_pipeline("wan", vae=False)
    mine = MyWan(**tp.pipe.components)
    with stg_ext.apply_stg(tp.pipe, 1, "attention"):
        expected = _run(tp.pipe, tp.call_kwargs(steps=2))
    with stg_ext.apply_stg(mine, 1, "attention"):
        assert torch.equal(_run(mine, tp.call_kwargs(steps=2)), expected)


def test_another_pipeline_sharing_the_denoiser_runs_stock_inside_a_callback():
    tp = tiny_pipeline("wan", vae=False)
    other = WanPipeline(**{**tp.pipe.components, "scheduler": type(tp.pipe.scheduler).from_config(
        tp.pipe.scheduler.config)})
    stock = _run(other, tp.call_kwargs(steps=2))
    seen = []

    def callback(pipe, i, t, kwargs):
        if i == 0:
            seen.append(_run(other, tp.call_kwargs(steps=2)))
        return {}

    with stg_ext.apply_stg(tp.pipe, 1, "attention"):
        _run(tp.pipe, tp.call_kwargs(steps=2, callback_on_step_end=callback))
    assert torch.equal(seen[0], stock)
