"""Fuzz (issue 15): `combine` and `identity_joint_attention` on the compiled CPU op against the plain references
(stg_ext/ops/reference.py), over shapes with empty dimensions, non-contiguous strides (transposed, sliced,
broadcast-expanded inputs), dtypes, scales (0, negative, large), and NaN/inf in the inputs, which must come out
where the reference puts them (NaN where it has NaN, the same infinities), the finite values within the dtype's
tolerance. Bounded example counts (about 10 s on one core).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stg_ext import combine, identity_joint_attention
from stg_ext.ops import available_backends
from stg_ext.ops.reference import combine_reference, identity_joint_attention_reference

from .._tolerances import TOLERANCES

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"),
                                reason="stg_ext._C did not build; only the reference runs")
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIALS = [float("nan"), float("inf"), float("-inf")]


def _assert_matches(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Same shape and dtype; NaN and infinities where the reference has them; the rest within tolerance."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    g, r = got.float(), ref.float()
    assert torch.equal(torch.isnan(g), torch.isnan(r)), "NaN positions differ"
    inf = torch.isinf(r)
    assert torch.equal(torch.isinf(g), inf) and torch.equal(g[inf], r[inf]), "infinities differ"
    finite = torch.isfinite(r)
    if finite.any():
        tol = TOLERANCES[ref.dtype]
        scale = max(1.0, r[finite].abs().max().item())
        torch.testing.assert_close(g[finite], r[finite], atol=tol["atol"] * scale, rtol=tol["rtol"])


def _layout(base: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if how == "transposed" and base.dim() >= 2:
        return base.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "sliced":
        wide = torch.zeros(*base.shape[:-1], 2 * base.shape[-1] + 1, dtype=base.dtype) if base.dim() else base
        if base.dim():
            wide[..., 1::2] = base
            return wide[..., 1::2]
    return base


def _specials(t: torch.Tensor, draw_positions, values) -> torch.Tensor:
    t = t.clone()
    flat = t.view(-1) if t.is_contiguous() else None
    if flat is not None and flat.numel():
        for pos, v in zip(draw_positions, values):
            flat[pos % flat.numel()] = v
    return t


@st.composite
def combine_case(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    two = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    n = 2 if two else 1
    tensors = [torch.randn(shape, generator=gen) for _ in range(n + 2)]  # cond, uncond, perturbed...
    if draw(st.booleans()):  # NaN / inf somewhere
        k = draw(st.integers(0, n + 1))
        tensors[k] = _specials(tensors[k], draw(st.lists(st.integers(0, 10 ** 6), min_size=1, max_size=3)),
                               draw(st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=3)))
    how = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    tensors = [_layout(t.to(dtype), how) for t in tensors]
    scale = st.one_of(st.just(0.0), st.floats(-4.0, 4.0), st.sampled_from([-1e3, 1e3]))
    case = dict(
        cond=tensors[0], uncond=tensors[1] if draw(st.booleans()) else None, perturbed=tensors[2:],
        cfg=draw(st.one_of(st.floats(1.5, 12.0), st.sampled_from([0.5, 1e3]))),
        scales=[draw(scale) for _ in range(n)], rescale=draw(st.sampled_from([0.0, 0.7, 1.0])),
        orthogonalize=two and draw(st.booleans()))
    case["fold"] = case["uncond"] is not None and draw(st.booleans())
    return case


@FUZZ
@given(combine_case())
def test_combine_matches_the_reference(case):
    c, u, ps = case["cond"], case["uncond"], case["perturbed"]
    args = dict(cfg_scale=case["cfg"], rescale=case["rescale"], orthogonalize=case["orthogonalize"],
                fold=case["fold"])
    stg = case["scales"][0] if len(ps) == 1 else tuple(case["scales"])
    got = combine(c, ps[0] if len(ps) == 1 else tuple(ps), u, stg_scale=stg, backend="cpu", **args)
    if case["rescale"] == 0.0 and all(s == 0.0 for s in case["scales"]):
        # The documented exact path: plain CFG in the inputs' dtype (or cond itself when folding).
        want = c.clone() if case["fold"] else (u + case["cfg"] * (c - u) if u is not None else c.clone())
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
        return
    ref = combine_reference(c, ps, u, case["cfg"], case["scales"], case["rescale"], case["orthogonalize"],
                            case["fold"])
    _assert_matches(got, ref)


@st.composite
def attention_case(draw):
    b, h = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    n, t, d = draw(st.integers(0, 6)), draw(st.integers(0, 5)), draw(st.sampled_from([1, 4, 8, 16]))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    transposed = draw(st.booleans())  # diffusers' layout: (B, N, H, D) viewed as (B, H, N, D)

    def make(length):
        if transposed:
            return torch.randn(b, length, h, d, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(b, h, length, d, generator=gen).to(dtype)

    q, kv, vv, kt, vt = make(n), make(n), make(n), make(t), make(t)
    if draw(st.booleans()) and q.numel():
        which = draw(st.sampled_from(["q", "v", "kt"]))
        value = draw(st.sampled_from(SPECIALS))
        if which == "q":
            q = q.clone(); q[0, 0, 0, 0] = value
        elif which == "v":
            vv = vv.clone(); vv[0, 0, 0, 0] = value
        elif kt.numel():
            kt = kt.clone(); kt[0, 0, 0, 0] = value
    bias = None
    if draw(st.booleans()) and t:
        keep = torch.rand(b, 1, 1, t, generator=gen) > draw(st.sampled_from([0.0, 0.5, 1.0]))  # 1.0: all masked
        bias = torch.zeros(b, 1, 1, t).masked_fill(~keep, float("-inf")).to(dtype)
        if draw(st.booleans()):
            bias = bias.expand(b, h, n, t)  # broadcast-expanded: stride 0
    scale = draw(st.one_of(st.none(), st.floats(0.01, 2.0)))
    return q, kv, vv, kt, vt, bias, scale


@FUZZ
@given(attention_case())
def test_identity_attention_matches_the_reference(case):
    q, kv, vv, kt, vt, bias, scale = case
    got = identity_joint_attention(q, kv, vv, kt, vt, text_bias=bias, scale=scale, backend="cpu")
    used = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ref = identity_joint_attention_reference(q, kv, vv, kt, vt, bias, used)
    _assert_matches(got, ref)
