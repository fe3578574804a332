"""The Triton backend of stg_ext.combine against the PyTorch reference: on the GPU where there is one, else on
CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 only without a GPU)."""
import os

import importlib.util  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import stg_ext  # noqa: E402
from stg_ext.ops.reference import combine_reference  # noqa: E402

from ._triton_trace import trace_without_interpreter  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton, and a GPU or TRITON_INTERPRET=1 set before triton is imported (CPU tensors)")

def _amax(t):
    return t.float().abs().max().item() if t.numel() else 0.0


# (atol, rtol) for comparing with the fp32 reference, as functions of (cond, reference output).
# Half and bfloat16 results may differ by one ulp of the output dtype: the fp32 math rounds differently,
# and the interpreter truncates fp32 -> bf16 instead of rounding to nearest (one bf16 ulp is 2**-7 relative).
TOLERANCES = {
    torch.float32: lambda c, ref: (1e-5 * _amax(c), 1e-5),
    torch.float16: lambda c, ref: (2e-3, 2e-3),
    torch.bfloat16: lambda c, ref: (1.6e-2 * max(1.0, _amax(ref)), 1.6e-2),
}
SHAPES = [(1, 12, 3, 17, 23), (2, 16, 5, 31, 45), (3, 7), (1, 1)]

# Keyword arguments of stg_ext.combine besides the tensors; "p" is one perturbed tensor, "pq" the pair.
CASES = {
    "stg_cfg": dict(perturbed="p", uncond=True, cfg_scale=4.5, stg_scale=1.0),
    "stg_alone": dict(perturbed="p", uncond=False, stg_scale=1.0),
    "rescale_0.7": dict(perturbed="p", uncond=True, cfg_scale=4.5, stg_scale=1.0, rescale=0.7),
    "rescale_1.0_no_uncond": dict(perturbed="p", uncond=False, stg_scale=2.0, rescale=1.0),
    "per_frame_cfg": dict(perturbed="p", uncond=True, cfg_scale="per_frame", stg_scale=1.0, rescale=0.7),
    "factorized": dict(perturbed="pq", uncond=True, cfg_scale=4.5, stg_scale=(1.0, 0.5)),
    "factorized_orthogonal": dict(perturbed="pq", uncond=True, cfg_scale=4.5, stg_scale=(1.0, 0.5),
                                  orthogonalize=True),
    "factorized_orthogonal_rescale": dict(perturbed="pq", uncond=True, cfg_scale=4.5, stg_scale=(1.0, 0.5),
                                          orthogonalize=True, rescale=0.7),
    "fold": dict(perturbed="p", uncond=True, cfg_scale=4.5, stg_scale=1.0, fold=True),
    "fold_rescale": dict(perturbed="p", uncond=True, cfg_scale=4.5, stg_scale=1.0, rescale=0.7, fold=True),
}


def _tensors(shape, dtype, seed=0, transposed=False):
    """cond, p, q, uncond; with transposed=True, non-contiguous views (last two dims swapped in memory)."""
    gen = torch.Generator().manual_seed(seed)
    store = shape[:-2] + (shape[-1], shape[-2]) if transposed else shape
    out = [torch.randn(store, generator=gen).to(DEVICE, dtype) for _ in range(4)]
    return [t.transpose(-1, -2) for t in out] if transposed else out


def _per_frame_cfg(shape):
    """SVD-style per-frame guidance: 1 on the first frame rising to 4.5, shaped (B, 1, F, 1, 1) on 5-D."""
    if len(shape) == 5:
        frames = torch.linspace(1.0, 4.5, shape[2]).view(1, 1, -1, 1, 1)
        return frames.expand(shape[0], 1, shape[2], 1, 1).clone().to(DEVICE)
    return torch.linspace(1.5, 4.5, shape[0]).view((shape[0],) + (1,) * (len(shape) - 1)).to(DEVICE)


def _kwargs(case, shape, p, q, u):
    kw = dict(CASES[case])
    kw["perturbed"] = p if kw["perturbed"] == "p" else (p, q)
    kw["uncond"] = u if kw["uncond"] else None
    if kw.get("cfg_scale") == "per_frame":
        kw["cfg_scale"] = _per_frame_cfg(shape)
    return kw


def _assert_matches(out, ref, cond):
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
    atol, rtol = TOLERANCES[cond.dtype](cond, ref)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, case):
    c, p, q, u = _tensors(shape, dtype)
    kw = _kwargs(case, shape, p, q, u)
    out = stg_ext.combine(c, **kw, backend="triton")
    _assert_matches(out, stg_ext.combine(c, **kw, backend="torch"), c)


@pytest.mark.parametrize("case", ["rescale_0.7", "factorized_orthogonal_rescale", "per_frame_cfg"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_non_contiguous_inputs(dtype, case):
    shape = (2, 16, 5, 31, 45)
    c, p, q, u = _tensors(shape, dtype, seed=1, transposed=True)
    assert not c.is_contiguous()
    kw = _kwargs(case, shape, p, q, u)
    out = stg_ext.combine(c, **kw, backend="triton")
    _assert_matches(out, stg_ext.combine(c, **kw, backend="torch"), c)


@pytest.mark.parametrize("shape", [(), (3,), (2, 1), (2, 0, 3), (2, 70000)], ids=str)
def test_degenerate_samples(shape):
    """0-dim, one-element and empty samples, and samples longer than one interpreter block (65536).

    One-element samples have std 0, so rescale must leave them alone (factor 1)."""
    c, p, q, u = _tensors(shape, torch.float32, seed=2) if len(shape) >= 2 else \
        [torch.randn(shape, device=DEVICE) for _ in range(4)]
    kw = dict(perturbed=(p, q), uncond=u, cfg_scale=4.5, stg_scale=(1.0, 0.5), orthogonalize=True, rescale=0.7)
    with warnings.catch_warnings():  # the reference's std() of an empty sample warns
        warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom")
        ref = stg_ext.combine(c, **kw, backend="torch")
    _assert_matches(stg_ext.combine(c, **kw, backend="triton"), ref, c)


def test_constant_sample_keeps_factor_one():
    """std(f) = 0 means factor 1 (STG_SPEC 2). A one-pass E[f^2] - E[f]^2 in fp32 leaves rounding noise that
    turns into an arbitrary factor. Compared with rescale=0 rather than with the reference, whose own std() of a
    constant is not always exactly 0 either."""
    c = torch.full((2, 3, 4097), 12.345, device=DEVICE)
    c[1] = torch.randn(3, 4097, device=DEVICE)
    p, u = torch.full_like(c, -0.37), torch.full_like(c, 0.013)
    kw = dict(perturbed=p, uncond=u, cfg_scale=4.5, stg_scale=1.0)
    out = stg_ext.combine(c, **kw, rescale=1.0, backend="triton")
    _assert_matches(out[:1], stg_ext.combine(c, **kw, backend="torch")[:1], c)
    _assert_matches(out[1:], stg_ext.combine(c, **kw, rescale=1.0, backend="torch")[1:], c)


def test_direct_op_call_edge_cases():
    """Cases stg_ext.combine never passes to the kernel (it shortcuts them) must still be right."""
    from stg_ext.kernels.combine_triton import combine_triton

    c, p, q, u = _tensors((2, 3, 5), torch.float32, seed=3)
    # All scales zero, no rescale: plain CFG.
    out = combine_triton(c, [p], u, None, 4.5, [0.0], 0.0, False, False)
    _assert_matches(out, combine_reference(c, [p], u, 4.5, [0.0], 0.0, False, False), c)
    # A cfg tensor overrides cfg_scale; orthogonalize without rescale.
    g = torch.rand(2, 3, 5, device=DEVICE) * 4 + 1
    out = combine_triton(c, [p, q], u, g, 123.0, [1.0, 0.5], 0.0, True, True)
    _assert_matches(out, combine_reference(c, [p, q], u, g, [1.0, 0.5], 0.0, True, True), c)
    with pytest.raises(ValueError, match="orthogonalize"):
        combine_triton(c, [p], u, None, 4.5, [1.0], 0.0, True, False)


def _combine_compiled(c, p, q, u, backend="triton"):
    return stg_ext.combine(c, (p, q), u, cfg_scale=4.5, stg_scale=(1.0, 0.5), rescale=0.7, orthogonalize=True,
                           backend=backend)


def test_torch_compile_under_interpreter():
    c, p, q, u = _tensors((2, 4, 3, 5, 6), torch.float32, seed=4)
    torch._dynamo.reset()
    try:
        out = torch.compile(_combine_compiled, fullgraph=True)(c, p, q, u)
    except Exception as exc:  # noqa: BLE001  (only the known limitation below is turned into a skip)
        if "Cannot access data pointer" not in str(exc):
            raise
        # Measured with torch 2.13 / triton 3.9: under TRITON_INTERPRET=1, @triton.jit returns an
        # InterpretedFunction and wrap_triton hands it back unwrapped (no JIT metadata to build the
        # triton_kernel_wrapper HOP from), so the triton_op's fake kernel - its own body - launches the
        # interpreter on FakeTensors while Dynamo propagates shapes, and that fails. The traced (GPU) path is
        # checked without the interpreter by test_torch_compile_traces_kernels_without_interpreter.
        pytest.skip("torch.compile cannot trace a triton_op under TRITON_INTERPRET=1: wrap_triton leaves "
                    "InterpretedFunction kernels unwrapped, so fake-tensor propagation runs the interpreter "
                    "on FakeTensors ('Cannot access data pointer of Tensor')")
    finally:
        torch._dynamo.reset()
    _assert_matches(out, _combine_compiled(c, p, q, u, backend="torch"), c)


def test_torch_compile_traces_kernels_without_interpreter():
    kernels, custom_op = trace_without_interpreter(
        """
        def fn(c, p, q, u, g):
            return stg_ext.combine(c, (p, q), u, cfg_scale=g, stg_scale=(1.0, 0.5), rescale=0.7,
                                   orthogonalize=True, backend="triton")
        """,
        "[torch.randn(2, 4, 3, 5, 6) for _ in range(4)] + [torch.linspace(1.0, 4.5, 3).view(1, 1, 3, 1, 1)]",
        "stg_ext.combine_triton")
    # Decomposed into its three kernels (reduction, per-sample coefficients, write), not kept as an opaque
    # custom op.
    assert (kernels, custom_op) == (3, False)
