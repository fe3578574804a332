"""The separate-call fold near g = 1 (issue 15): the pipeline's CFG line on what the cond and the uncond call return
stays within `8 eps (1 + |g|) M` of STG's `f` (M = max(|u|, |c|, |p|, |f|), eps: the dtype's machine epsilon),
against a float64 reference, at g = 1 +- 1e-3, 1 +- 1e-6 and far from 1; and end to end on a tiny Wan pipeline.

The earlier fold (`c' = c + (s/g)(c - p)`, `u' = (f - g c')/(1 - g)`) is checked to break that bound at
g = 1 + 1e-6, so the test can tell the two apart.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import stg_ext
from stg_ext.guidance.separate_fold import cond_return, uncond_return
from stg_ext.ops.reference import combine_reference
from stg_ext.testing.tiny import tiny_pipeline

GS = [1 + 1e-3, 1 + 1e-6, 1 - 1e-6, 1 - 1e-3, 0.5, 1.5, 4.5, 12.0]
SCALE, RESCALE = 1.0, 0.7


def _inputs(dtype, seed=0, shape=(2, 4, 3, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=gen)
    u = c + 0.5 * torch.randn(shape, generator=gen)
    p = c + 0.8 * torch.randn(shape, generator=gen)
    return [t.to(dtype) for t in (u, c, p)]


def _pipeline_line(u_ret, c_ret, g):
    """What a separate-call pipeline (Wan, HunyuanVideo, ...) computes, in its own dtype."""
    return u_ret + g * (c_ret - u_ret)


def _reference(u, c, p, g):
    return combine_reference(c.double(), [p.double()], u.double(), g, [SCALE], RESCALE, False, False)


def _bound(u, c, p, f_ref, g):
    m = max(t.double().abs().max().item() for t in (u, c, p, f_ref))
    return 8 * torch.finfo(c.dtype).eps * (1 + abs(g)) * m


def _folded(u, c, p, g):
    c_ret, adjust = cond_return(c, p, g, SCALE, RESCALE, False)
    u_ret = u
    if adjust:
        f = stg_ext.combine(c, p, u, cfg_scale=g, stg_scale=SCALE, rescale=RESCALE)
        u_ret = uncond_return(f, c_ret, g, u.dtype)
    return u_ret, c_ret


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g", GS)
def test_pipeline_line_within_the_bound(dtype, g):
    u, c, p = _inputs(dtype)
    u_ret, c_ret = _folded(u, c, p, g)
    f_ref = _reference(u, c, p, g)
    err = (_pipeline_line(u_ret, c_ret, g).double() - f_ref).abs().max().item()
    bound = _bound(u, c, p, f_ref, g)
    assert err <= bound, f"g={g} {dtype}: max error {err:.3g} > bound {bound:.3g}"
    # What the pipeline's rounding acts on stays of the size of the inputs (no 1/(1 - g) growth).
    assert u_ret.double().abs().max().item() <= 10 * max(t.double().abs().max().item() for t in (u, c, p))


def test_the_earlier_fold_breaks_the_bound():
    g = 1 + 1e-6
    u, c, p = _inputs(torch.float32)
    c_ret = stg_ext.combine(c, p, None, stg_scale=SCALE / g)
    f = stg_ext.combine(c, p, u, cfg_scale=g, stg_scale=SCALE, rescale=RESCALE)
    u_ret = ((f.float() - g * c_ret.float()) / (1.0 - g)).to(u.dtype)
    f_ref = _reference(u, c, p, g)
    err = (_pipeline_line(u_ret, c_ret, g).double() - f_ref).abs().max().item()
    assert err > 100 * _bound(u, c, p, f_ref, g)


def _reference_wan(tp, g, steps=2):
    """A plain loop of the same pipeline: the stock model for u and c, the weak model for p, f in float64, returned
    from both calls (cond first) so that the pipeline's line gives f."""
    model = tp.pipe.transformer
    kw = tp.call_kwargs(steps=steps, guidance_scale=g)
    stock = model.forward
    weak_out = {}
    calls = [0]

    def forward(*args, **kwargs):
        out = stock(*args, **kwargs)
        k, calls[0] = calls[0], calls[0] + 1
        if k % 2 == 1:
            return (weak_out["f"],)
        c = out[0]
        neg = dict(kwargs, encoder_hidden_states=kw["negative_prompt_embeds"])
        u = stock(*args, **neg)[0]
        with stg_ext.perturbed(model, 1, "residual"):
            p = stock(*args, **kwargs)[0]
        weak_out["f"] = _reference(u, c, p, g).to(c.dtype)
        return (weak_out["f"],)

    model.forward = forward
    try:
        return tp.pipe(**kw).frames
    finally:
        del model.forward


@pytest.mark.parametrize("g", [1 + 1e-3, 1 + 1e-6])
def test_wan_near_one_matches_a_float64_reference(g):
    tp = tiny_pipeline("wan", vae=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _reference_wan(tp, g)
        with stg_ext.apply_stg(tp.pipe, 1, "residual", scale=SCALE, rescale=RESCALE):
            out = tp.pipe(**tp.call_kwargs(steps=2, guidance_scale=g)).frames
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 1e-5 * scale
