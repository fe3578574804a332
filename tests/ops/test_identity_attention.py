"""stg_ext.identity_joint_attention: the reference against masked joint attention in float64, every backend
("cpu", "triton" under the interpreter, "cuda" where it exists) against the reference, exact results for
T = 0 and fully masked rows, non-contiguous inputs, bad input, torch.library and torch.compile integration.
"""
import os  # noqa: F401  (tests/conftest.py chose TRITON_INTERPRET before triton was imported)

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import stg_ext  # noqa: E402
from stg_ext import identity_joint_attention  # noqa: E402

from ._triton_trace import trace_without_interpreter  # noqa: E402
from stg_ext import ops  # noqa: E402
from stg_ext.ops import joint_attention  # noqa: E402
from stg_ext.ops.reference import identity_joint_attention_reference  # noqa: E402

from .._tolerances import TOLERANCES, assert_close  # noqa: E402

DTYPES = list(TOLERANCES)
TRITON = "triton" in ops.available_backends("cpu")
COMPILED = [b for b in ("cpu",) if b in ops.available_backends("cpu")]
if torch.cuda.is_available():
    COMPILED += [b for b in ("cuda", "triton") if b in ops.available_backends("cuda")]
# Backends that run on this machine's test tensors ("triton" on CPU tensors under the interpreter).
FAST = COMPILED + (["triton"] if TRITON and "triton" not in COMPILED else [])

# (B, H, N, D, T): odd N and D, T not a multiple of any tile, T = 0, more queries than one CPU work item (64),
# more keys than one CPU key chunk (128), head dims 16..128.
SHAPES = [(1, 2, 37, 16, 5), (2, 3, 300, 64, 77), (1, 2, 10, 16, 0), (2, 1, 130, 33, 150), (1, 2, 70, 128, 129)]
# The Triton interpreter costs ~0.3 s a call: a smaller matrix there.
TRITON_SHAPES = SHAPES[:3]
BIASES = ["none", "B11T", "B1NT"]


def make_inputs(shape, dtype, bias="none", seed=0, device="cpu"):
    B, H, N, D, T = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(device, dtype) for _ in range(3))
    kt, vt = (torch.randn(B, H, T, D, generator=gen).to(device, dtype) for _ in range(2))
    text_bias = None
    if bias == "B11T":  # a text padding mask: sample 0 sees every key, the others only the first half
        text_bias = torch.zeros(B, 1, 1, T)
        text_bias[1:, ..., (T + 1) // 2:] = float("-inf")
    elif bias == "B1NT":  # per-query additive bias with some hidden keys
        text_bias = torch.randn(B, 1, N, T, generator=gen)
        text_bias[torch.rand(B, 1, N, T, generator=gen) < 0.2] = float("-inf")
    if text_bias is not None:
        text_bias = text_bias.to(device)
    return q, k, v, kt, vt, text_bias


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and "triton" in COMPILED) else "cpu"


# --- the reference against what the model computes without the op -----------------------------------

def _masked_joint_attention(q, k, v, kt, vt, text_bias, scale):
    """Full attention over the joint [video; text] sequence in float64, with a mask that leaves every video
    query only itself and the text keys (plus the text bias): STG-A written out the expensive way."""
    B, H, N, D = q.shape
    T = kt.shape[2]
    keys = torch.cat([k, kt], dim=2).double()
    values = torch.cat([v, vt], dim=2).double()
    logits = q.double() @ keys.transpose(-1, -2) * scale
    allowed = torch.zeros(N, N + T, dtype=torch.bool)
    allowed[torch.arange(N), torch.arange(N)] = True
    allowed[:, N:] = True
    bias = torch.zeros(B, H, N, N + T, dtype=torch.float64)
    if text_bias is not None:
        bias[..., N:] = text_bias.double().expand(B, H, N, T)
    logits = torch.where(allowed, logits + bias, float("-inf"))
    return torch.softmax(logits, dim=-1) @ values


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_reference_matches_masked_joint_attention(shape, bias):
    q, k, v, kt, vt, tb = make_inputs(shape, torch.float32, bias)
    got = identity_joint_attention(q, k, v, kt, vt, text_bias=tb, backend="torch")
    want = _masked_joint_attention(q, k, v, kt, vt, tb, shape[3] ** -0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# --- every backend against the reference --------------------------------------------------------

def _matrix():
    for backend in FAST:
        shapes = TRITON_SHAPES if backend == "triton" and _device(backend) == "cpu" else SHAPES
        biases = ["none", "B1NT"] if backend == "triton" and _device(backend) == "cpu" else BIASES
        for dtype in DTYPES:
            for shape in shapes:
                for bias in biases:
                    yield pytest.param(backend, dtype, shape, bias, id=f"{backend}-{dtype}-{shape}-{bias}")


@pytest.mark.skipif(not FAST, reason="no compiled or Triton backend here; only the reference runs")
@pytest.mark.parametrize("backend,dtype,shape,bias", list(_matrix()))
def test_backend_matches_reference(backend, dtype, shape, bias):
    q, k, v, kt, vt, tb = make_inputs(shape, dtype, bias, device=_device(backend))
    got = identity_joint_attention(q, k, v, kt, vt, text_bias=tb, backend=backend)
    want = identity_joint_attention_reference(q, k, v, kt, vt, tb, shape[3] ** -0.5)
    assert got.dtype == v.dtype and got.shape == v.shape and got.is_contiguous()
    assert_close(got, want)


@pytest.mark.skipif("triton" not in FAST, reason="needs triton (a GPU, or the interpreter)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_multi_chunk_softmax(dtype):
    """The text keys span several BLOCK_T chunks in every launch config: the running max grows in a later chunk
    (alpha < 1 rescales the accumulator), one sample's whole first chunk is masked, a partial last chunk."""
    from stg_ext.kernels import identity_attention_triton as it

    block_t = max(c.kwargs["BLOCK_T"] for c in it.CONFIGS)
    B, H, N, D, T = 2, 2, 40, 32, 3 * block_t + 5
    assert T > 3 * block_t  # >= 4 chunks, the last one partial
    q, k, v, kt, vt, _ = make_inputs((B, H, N, D, T), dtype, device=_device("triton"))
    kt[:, :, T - 3] *= 4  # large logits in the last chunk: the max moves there
    tb = torch.zeros(B, 1, N, T, device=q.device)
    tb[1, ..., :block_t] = float("-inf")  # sample 1: its whole first chunk hidden
    tb[0, :, ::3, T - 3] = float("-inf")  # and the big key hidden from every third query of sample 0
    got = identity_joint_attention(q, k, v, kt, vt, text_bias=tb, backend="triton")
    want = identity_joint_attention_reference(q, k, v, kt, vt, tb, D ** -0.5)
    assert_close(got, want)


def test_triton_refuses_head_dims_above_128():
    q, k, v, kt, vt, _ = make_inputs((1, 1, 4, 160, 3), torch.float32)
    with pytest.raises(ValueError, match="backend 'triton' takes head dims up to 128, got 160"):
        identity_joint_attention(q, k, v, kt, vt, backend="triton")


@pytest.mark.skipif(not FAST, reason="no compiled or Triton backend here")
@pytest.mark.parametrize("backend", FAST)
def test_custom_scale_and_scalar_bias(backend):
    q, k, v, kt, vt, _ = make_inputs((2, 2, 20, 32, 9), torch.float32, device=_device(backend))
    for tb in (torch.tensor(0.5), torch.full((1, 1, 1, 1), -1.0), torch.randn(2, 2, 20, 9)):
        tb = tb.to(q.device)
        got = identity_joint_attention(q, k, v, kt, vt, text_bias=tb, scale=0.3, backend=backend)
        assert_close(got, identity_joint_attention_reference(q, k, v, kt, vt, tb, 0.3))


# --- exact cases ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch"] + FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_text_returns_v_video_exactly(backend, dtype):
    q, k, v, kt, vt, _ = make_inputs((2, 3, 45, 16, 0), dtype, device=_device(backend))
    out = identity_joint_attention(q, k, v, kt, vt, backend=backend)
    assert torch.equal(out, v)


@pytest.mark.parametrize("backend", ["torch"] + FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_return_v_video_exactly(backend, dtype):
    shape = (2, 2, 70, 32, 140)  # 140 keys: two CPU key chunks
    q, k, v, kt, vt, tb = make_inputs(shape, dtype, "B1NT", seed=1, device=_device(backend))
    tb[:, :, ::3] = float("-inf")  # every third query sees no text key
    tb[1] = float("-inf")  # and sample 1 none at all
    out = identity_joint_attention(q, k, v, kt, vt, text_bias=tb, backend=backend)
    hidden = torch.zeros(2, 1, 70, dtype=torch.bool)
    hidden[:, :, ::3] = True
    hidden[1] = True
    hidden = hidden.expand(2, 2, 70)
    assert torch.equal(out[hidden], v[hidden])
    assert_close(out[~hidden], identity_joint_attention_reference(q, k, v, kt, vt, tb, 32 ** -0.5)[~hidden])


# --- layouts ------------------------------------------------------------------------------------

def _joint_views(dtype, device, B=2, H=3, N=50, T=13, D=24):
    """Video and text as slices of one joint (B, H, S, D) sequence, as joint_identity_sdpa passes them, and
    a (B, N, H, D) layout transposed to (B, H, N, D): neither is contiguous."""
    gen = torch.Generator().manual_seed(7)
    joint = [torch.randn(B, H, N + T, D, generator=gen).to(device, dtype) for _ in range(3)]
    q = joint[0][:, :, :N]
    k = torch.randn(B, N, H, D, generator=gen).to(device, dtype).transpose(1, 2)
    v = joint[2][:, :, :N]
    kt, vt = joint[1][:, :, N:], joint[2][:, :, N:]
    bias = torch.randn(B, 1, T, N, generator=gen).to(device).transpose(-1, -2)  # (B, 1, N, T), strided
    return q, k, v, kt, vt, bias


@pytest.mark.skipif(not FAST, reason="no compiled or Triton backend here")
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(backend, dtype):
    q, k, v, kt, vt, tb = _joint_views(dtype, _device(backend))
    assert not any(t.is_contiguous() for t in (q, k, v, kt, vt, tb))
    got = identity_joint_attention(q, k, v, kt, vt, text_bias=tb, backend=backend)
    assert_close(got, identity_joint_attention_reference(q, k, v, kt, vt, tb, 24 ** -0.5))


@pytest.mark.skipif("cpu" not in COMPILED, reason="stg_ext._C did not build")
def test_auto_picks_the_cpu_kernel_and_torch_for_float64():
    q, k, v, kt, vt, tb = make_inputs((1, 2, 8, 16, 3), torch.float32, "B1NT")
    assert joint_attention.resolve_attention_backend("auto", q) == "cpu"
    assert joint_attention.resolve_attention_backend("auto", q.double()) == "torch"
    auto = identity_joint_attention(q, k, v, kt, vt, text_bias=tb)
    assert torch.equal(auto, identity_joint_attention(q, k, v, kt, vt, text_bias=tb, backend="cpu"))
    d = [t.double() for t in (q, k, v, kt, vt)]
    torch.testing.assert_close(identity_joint_attention(*d, text_bias=tb), identity_joint_attention_reference(
        *d, tb, 16 ** -0.5))


@pytest.mark.skipif("cpu" not in COMPILED, reason="stg_ext._C did not build")
def test_each_isa_build_matches_reference(tmp_path):
    # The CPU kernel's loops exist for baseline x86-64, AVX2 and AVX-512; the default run uses the widest the
    # CPU has, STG_EXT_CPU_ISA caps it so that the narrower builds are checked too. One process per build;
    # they load the compiled library alone (importing stg_ext would import diffusers: seconds each) and run
    # the op on inputs saved here, the reference runs here.
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((2, 2, 70, 24, 37), (1, 3, 33, 64, 150)):
            cases.append(make_inputs(shape, dtype, "B1NT", seed=len(cases)))
    torch.save(cases, tmp_path / "cases.pt")
    code = textwrap.dedent("""
        import sys, torch
        torch.ops.load_library(sys.argv[1])
        cases = torch.load(sys.argv[2])
        outs = [torch.ops.stg_ext.identity_joint_attention(*c, c[0].shape[-1] ** -0.5) for c in cases]
        torch.save(outs, sys.argv[3])
    """)
    from stg_ext import _C

    procs = {isa: subprocess.Popen([sys.executable, "-c", code, _C.__file__, str(tmp_path / "cases.pt"),
                                    str(tmp_path / f"{isa}.pt")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env={**os.environ, "STG_EXT_CPU_ISA": isa})
             for isa in ("baseline", "avx2")}
    for isa, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"STG_EXT_CPU_ISA={isa}:\n{err[-3000:]}"
        for c, out in zip(cases, torch.load(tmp_path / f"{isa}.pt")):
            assert_close(out, identity_joint_attention_reference(*c, c[0].shape[-1] ** -0.5))


# --- bad input ----------------------------------------------------------------------------------

def _bad(**over):
    q, k, v, kt, vt, _ = make_inputs((2, 2, 6, 8, 4), torch.float32)
    args = dict(q_video=q, k_video=k, v_video=v, k_text=kt, v_text=vt)
    args.update(over)
    return args


BAD = [
    (dict(k_video=torch.zeros(2, 2, 5, 8)), ValueError, r"k_video has shape \(2, 2, 5, 8\)"),
    (dict(q_video=torch.zeros(2, 6, 8), k_video=torch.zeros(2, 6, 8), v_video=torch.zeros(2, 6, 8)), ValueError,
     r"q_video must be \(B, H, N, D\)"),
    (dict(k_text=torch.zeros(2, 2, 4, 7)), ValueError, r"k_text/v_text must be \(B, H, T, D\)"),
    (dict(v_text=torch.zeros(2, 2, 3, 8)), ValueError, r"k_text/v_text must be \(B, H, T, D\)"),
    (dict(v_video=torch.zeros(2, 2, 6, 8, dtype=torch.float16)), ValueError, "v_video has dtype torch.float16"),
    (dict(text_bias=torch.ones(2, 2, 6, 4, dtype=torch.bool)), ValueError, "additive floating-point mask"),
    (dict(text_bias=torch.zeros(2, 2, 6, 5)), ValueError, r"does not broadcast to \(B, H, N, T\) = \(2, 2, 6, 4\)"),
    (dict(text_bias=torch.zeros(3, 1, 1, 4)), ValueError, "does not broadcast"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite real number"),
    (dict(backend="fast"), ValueError, "valid: auto, torch, cpu, triton, cuda"),
    (dict(backend="cuda"), (ValueError, RuntimeError), "cuda"),
]


@pytest.mark.parametrize("over,exc,match", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_is_named(over, exc, match):
    args = _bad(**over)
    with pytest.raises(exc, match=match):
        identity_joint_attention(args.pop("q_video"), args.pop("k_video"), args.pop("v_video"),
                                 args.pop("k_text"), args.pop("v_text"), **args)


@pytest.mark.skipif("cpu" not in COMPILED, reason="stg_ext._C did not build")
def test_float64_on_a_fused_backend_is_named():
    args = [t.double() for t in list(_bad().values())]
    with pytest.raises(ValueError, match="takes dtypes torch.float32, torch.float16, torch.bfloat16.*'torch'"):
        identity_joint_attention(*args, backend="cpu")


@pytest.mark.skipif("cpu" not in COMPILED, reason="stg_ext._C did not build")
def test_direct_op_call_checks_arguments():
    q, k, v, kt, vt = _bad().values()
    op = torch.ops.stg_ext.identity_joint_attention
    with pytest.raises(RuntimeError, match="text_bias must be float32"):
        op(q, k, v, kt, vt, torch.zeros(4, dtype=torch.float16), 0.5)
    with pytest.raises(RuntimeError, match=r"does not broadcast to \(B, H, N, T\)"):
        op(q, k, v, kt, vt, torch.zeros(5), 0.5)
    with pytest.raises(RuntimeError, match="k_text/v_text must be"):
        op(q, k, v, kt[:, :1], vt, None, 0.5)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16.*backend='torch'"):
        op(*(t.double() for t in (q, k, v, kt, vt)), None, 0.5)


@pytest.mark.skipif(not TRITON, reason="needs triton with TRITON_INTERPRET=1")
def test_direct_triton_op_call_checks_arguments():
    from stg_ext.kernels.identity_attention_triton import identity_joint_attention_triton

    q, k, v, kt, vt = _bad().values()
    with pytest.raises(ValueError, match="text_bias must be float32"):
        identity_joint_attention_triton(q, k, v, kt, vt, torch.zeros(4, dtype=torch.float16), 0.5)
    with pytest.raises(ValueError, match="k_text/v_text must be"):
        identity_joint_attention_triton(q, k, v, kt[:, :1], vt, None, 0.5)


# --- torch.library / torch.compile --------------------------------------------------------------

@pytest.mark.skipif("cpu" not in COMPILED, reason="stg_ext._C did not build")
@pytest.mark.parametrize("bias", BIASES)
def test_opcheck(bias):
    q, k, v, kt, vt, tb = make_inputs((2, 2, 9, 16, 5), torch.float32, bias)
    torch.library.opcheck(torch.ops.stg_ext.identity_joint_attention.default, (q, k, v, kt, vt, tb, 0.25))


@pytest.mark.skipif("cpu" not in COMPILED, reason="stg_ext._C did not build")
def test_runs_under_torch_compile_without_graph_breaks():
    torch._dynamo.reset()

    def attend(q, k, v, kt, vt, tb):
        return identity_joint_attention(q, k, v, kt, vt, text_bias=tb)

    q, k, v, kt, vt, tb = make_inputs((1, 2, 40, 32, 7), torch.float32, "B11T")
    compiled = torch.compile(attend, fullgraph=True, backend="inductor")
    assert_close(compiled(q, k, v, kt, vt, tb), attend(q, k, v, kt, vt, tb))
    explained = torch._dynamo.explain(attend)(q, k, v, kt, vt, tb)
    assert explained.graph_break_count == 0
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("stg_ext.identity_joint_attention" in t for t in targets), targets
    torch._dynamo.reset()


@pytest.mark.skipif(not TRITON, reason="needs triton")
def test_torch_compile_traces_triton_kernel_without_interpreter():
    kernels, custom_op = trace_without_interpreter(
        """
        def fn(q, k, v, kt, vt, tb):
            return stg_ext.identity_joint_attention(q, k, v, kt, vt, text_bias=tb, backend="triton")
        """,
        "[torch.randn(1, 2, 40, 32) for _ in range(3)] + [torch.randn(1, 2, 7, 32) for _ in range(2)]"
        " + [torch.zeros(1, 1, 1, 7)]",
        "stg_ext.identity_joint_attention_triton")
    # Decomposed into its kernel, not kept as an opaque custom op.
    assert (kernels, custom_op) == (1, False)


def test_joint_identity_sdpa_uses_the_op():
    # The model-side caller (stg_ext.weak.identity_attention) with a boolean SDPA mask over [video; text].
    from stg_ext.weak.adapters.base import JointLayout
    from stg_ext.weak.identity_attention import joint_identity_sdpa

    B, H, N, T, D = 1, 2, 30, 6, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, N + T, D, generator=gen) for _ in range(3))
    mask = torch.ones(B, 1, 1, N + T, dtype=torch.bool)
    mask[..., -2:] = False  # the last two text tokens are padding
    out = joint_identity_sdpa(q, k, v, mask, None, N, JointLayout(video_first=True))
    bias = torch.zeros(B, 1, 1, T)
    bias[..., -2:] = float("-inf")
    want = identity_joint_attention_reference(q[:, :, :N], k[:, :, :N], v[:, :, :N], k[:, :, N:], v[:, :, N:], bias,
                                              D ** -0.5)
    torch.testing.assert_close(out[:, :, :N], want, rtol=1e-5, atol=1e-5)
