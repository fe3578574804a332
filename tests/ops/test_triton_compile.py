"""Every Triton kernel of stg_ext, in every constexpr variant the ops launch and every GPU launch config,
compiles for sm_80 and sm_90 without a GPU (triton.compile with GPUTarget), and none spills: registers, stack and
local memory are read from each cubin with cuobjdump (stg_ext.kernels.gpu_compile). Compile-checked only: nothing
runs here.

The compiles run in a fresh interpreter without TRITON_INTERPRET (interpreted kernels cannot be compiled), two
processes; Triton's cache (~/.triton/cache) makes a rerun with unchanged kernels quick.
"""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

KERNELS = {"_reduce_kernel", "_coeffs_kernel", "_write_kernel", "_identity_attention_kernel"}


def _launch_counts():
    """Distinct launches per kernel in gpu_compile.all_launches(), computed in a clean interpreter."""
    code = ("import collections; from stg_ext.kernels import gpu_compile as g; "
            "print(dict(collections.Counter(la.kernel.__name__ if hasattr(la.kernel, '__name__') else "
            "la.kernel.fn.__name__ for la in g.all_launches())))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return eval(run.stdout.strip().splitlines()[-1])  # noqa: S307  (our own dict literal)


def test_every_launch_variant_is_listed():
    counts = _launch_counts()
    # combine in bf16: reduce/write for uncond x cfg tensor x (one, two, orthogonalized) perturbed (12), the write
    # kernel also with fold (uncond only) and with/without coefficients (30), coeffs for ortho x rescale (3);
    # plus fp32 and fp16 in the all-flags variant (reduce, write). Attention: bias x head-dim block 16/32/64/128 in
    # bf16 and fp32 (16), fp16 at 128 with and without bias (2).
    assert counts == {"_reduce_kernel": 14, "_coeffs_kernel": 3, "_write_kernel": 32,
                      "_identity_attention_kernel": 18}, counts


def test_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    out = tmp_path / "triton_resources.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "stg_ext.kernels.gpu_compile", "--jobs", "2", "--csv", str(out)],
                         env=env, capture_output=True, text=True, timeout=3600)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-5000:]
    rows = list(csv.DictReader(out.open()))
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in KERNELS for a in ("sm_80", "sm_90")}
    spilling = [r for r in rows if int(r["spill_bytes"]) or int(r["stack"])]
    assert not spilling, "spills (local/stack bytes):\n" + "\n".join(map(str, spilling))
    assert all(int(r["registers"]) > 0 for r in rows)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # The same number of compiled variants on both targets.
    per_arch = {a: sum(r["arch"] == a for r in rows) for a in ("sm_80", "sm_90")}
    assert per_arch["sm_80"] == per_arch["sm_90"], per_arch
