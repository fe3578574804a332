"""Ahead-of-time compilation of stg_ext's Triton kernels for real GPU targets, without a GPU.

`compile_launch(launch, arch)` takes one `Launch` of a kernel module's `launch_plan` (the kernel, its grid, the
arguments and constexprs the op passes) and compiles it with `triton.compile` for `GPUTarget("cuda", arch, 32)`
in every autotune config, specialized the way Triton's launcher specializes a real call (16-byte aligned
pointers and integers divisible by 16 marked so, integers equal to 1 made constants). The resources (registers,
spills, shared memory) are read from the cubin with cuobjdump (the toolkit's or triton's bundled one): loading a
kernel to ask the driver needs a GPU.

Used by tests/ops/test_triton_compile.py and scripts/gpu_check.sh: `python -m stg_ext.kernels.gpu_compile
[--jobs 2] [--csv FILE]` prints the README's table of registers, spills and shared memory.
Needs triton imported WITHOUT TRITON_INTERPRET=1 (the interpreter's JITFunctions cannot be compiled).
"""
from __future__ import annotations

import argparse
import csv
import glob
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64"}


@dataclass
class Compiled:
    kernel: str
    arch: int
    config: str  # the constexprs and warps/stages, e.g. "BLOCK=2048 HAS_UNCOND=True ... warps=4 stages=3"
    registers: int
    spill_bytes: int  # local memory per thread: spill stores land there (0 = no spills)
    stack: int
    shared: int  # static + Triton's dynamic shared memory, bytes
    ptx_spills: str  # ptxas's own words, when it reports spills


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    hits = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    if not hits:
        raise RuntimeError("no cuobjdump: neither on PATH nor bundled with triton")
    return hits[0]


def _resources(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                             timeout=120)
    finally:
        os.unlink(path)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump --dump-resource-usage failed: {out.stderr}")
    res = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out.stdout)
        res[key] = int(m.group(1)) if m else 0
    return res


def _signature(fn, args: tuple, constexprs: dict):
    """Signature, constexprs and attrs of a call as Triton's launcher would specialize it."""
    names = fn.arg_names
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
            consts[name] = constexprs[name]
            continue
        if i >= len(args):
            raise TypeError(f"{fn.__name__}: no value for argument {name}")
        a = args[i]
        nospec = i in getattr(fn, "do_not_specialize", ()) or name in getattr(fn, "do_not_specialize", ())
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _DTYPE[a.dtype]
            if a.data_ptr() % 16 == 0:  # meta tensors report 0; torch's allocations are 512-byte aligned
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            if a == 1 and not nospec:
                sig[name] = "constexpr"
                consts[name] = 1
                continue
            sig[name] = "i32" if -2**31 <= a < 2**31 else "i64"
            if a % 16 == 0 and not nospec:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialize argument {name}={a!r}")
    return sig, consts, attrs


def configs_of(kernel):
    """[(jit function, config constexprs, num_warps, num_stages)] for a JITFunction or an Autotuner."""
    if isinstance(kernel, triton.runtime.autotuner.Autotuner):
        return [(kernel.fn, dict(c.kwargs), c.num_warps, c.num_stages) for c in kernel.configs]
    return [(kernel, {}, None, None)]


def compile_launch(launch, arch: int) -> List[Compiled]:
    """Compiles one launch of a launch_plan for sm_<arch>, in every autotune config the kernel keeps for it
    (after the kernel's own config pruning, as the autotuner would on a GPU)."""
    out = []
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    kernel = launch.kernel
    configs = configs_of(kernel)
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None:
        named = dict(zip(kernel.fn.arg_names, launch.args))
        kept = prune(kernel.configs, named, **launch.constexprs)
        configs = [(kernel.fn, dict(c.kwargs), c.num_warps, c.num_stages) for c in kept]
    for fn, cfg, warps, stages in configs:
        constexprs = dict(launch.constexprs)
        warps = constexprs.pop("num_warps", warps) or 4
        stages = constexprs.pop("num_stages", stages) or 3
        constexprs.update(cfg)
        sig, consts, attrs = _signature(fn, launch.args, constexprs)
        options = backend.parse_options({"num_warps": warps, "num_stages": stages})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                           options=options.__dict__)
        res = _resources(k.asm["cubin"])
        shared = max(res["SHARED"], int(getattr(k.metadata, "shared", 0) or 0))
        label = " ".join(f"{n}={v}" for n, v in sorted(constexprs.items())) + f" warps={warps} stages={stages}"
        out.append(Compiled(fn.__name__, arch, label, res["REG"], res["LOCAL"], res["STACK"], shared, ""))
    return out


# --- every launch the ops make --------------------------------------------------------------------------------

def combine_launches(dtypes=(torch.float32, torch.float16, torch.bfloat16), shape=(2, 16, 21, 60, 104)):
    """Every distinct launch of combine_triton over its argument space (dtype, uncond, cfg tensor, one or two
    perturbed tensors, orthogonalize, rescale, fold), on meta tensors of `shape`."""
    from . import combine_triton as ct

    seen, plans = set(), []
    for dtype in dtypes:
        t = lambda: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
        for has_u in (False, True):
            for has_cfg in (False, True):
                for mode in ("one", "two", "ortho"):
                    for rescale in (0.0, 0.7):
                        for fold in ((False, True) if has_u else (False,)):
                            pert = [t()] if mode == "one" else [t(), t()]
                            scales = [1.0] if mode == "one" else [1.0, 0.5]
                            cfg = torch.empty(shape, dtype=torch.float32, device="meta") if has_cfg else None
                            _, launches = ct.launch_plan(t(), pert, t() if has_u else None, cfg, 4.5, scales,
                                                         rescale, mode == "ortho", fold)
                            for la in launches:
                                key = (la.kernel, tuple(_DTYPE[a.dtype] if isinstance(a, torch.Tensor) else
                                                        type(a).__name__ for a in la.args),
                                       tuple(sorted(la.constexprs.items())))
                                if key not in seen:
                                    seen.add(key)
                                    plans.append(la)
    return plans


# Mochi (24 heads x 128, 256 text tokens), Wan 2.1 (12 x 128 at 1.3B, 512 tokens), LTX (32 x 64, 128 tokens),
# plus small head dims (the CPU tests' 16 and 33 -> BLOCK_D 16, 64).
ATTENTION_SHAPES = {"mochi": (1, 24, 1024, 128, 256), "wan": (1, 12, 1024, 128, 512), "ltx": (1, 32, 1024, 64, 128),
                    "d16": (1, 2, 256, 16, 77), "d32": (1, 2, 256, 32, 77)}


def attention_launches(dtypes=(torch.float32, torch.float16, torch.bfloat16), shapes=ATTENTION_SHAPES):
    """Every distinct launch of identity_joint_attention_triton: dtype x bias x head-dim block, on meta tensors."""
    from . import identity_attention_triton as it

    seen, plans = set(), []
    for dtype in dtypes:
        for (B, H, N, D, T) in shapes.values():
            for has_bias in (False, True):
                q, k, v = (torch.empty(B, H, N, D, dtype=dtype, device="meta") for _ in range(3))
                kt, vt = (torch.empty(B, H, T, D, dtype=dtype, device="meta") for _ in range(2))
                bias = torch.empty(B, 1, 1, T, device="meta") if has_bias else None
                _, launches = it.launch_plan(q, k, v, kt, vt, bias, D ** -0.5)
                for la in launches:
                    key = (str(dtype), has_bias, la.constexprs["BLOCK_D"])
                    if key not in seen:
                        seen.add(key)
                        plans.append(la)
    return plans


_FLAGS = ("HAS_UNCOND", "HAS_CFG", "TWO", "ORTHO", "FOLD", "COEFFS", "HAS_BIAS")


def _all_flags_on(launch) -> bool:
    return all(v for k, v in launch.constexprs.items() if k in _FLAGS)


def all_launches():
    """The launches the compile checks build: every constexpr variant of every kernel in bf16 (the GPU models'
    dtype), plus fp32 and fp16 where the element type changes the code: combine's all-flags variants (its
    widest loads and most registers) and every attention variant in fp32 (its own IEEE-dot path,
    DOT_F32=True); fp16 attention shares bf16's code path and is compiled at its largest head dim."""
    bf, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    launches = combine_launches(dtypes=(bf,))
    launches += [la for la in combine_launches(dtypes=(f32, f16)) if _all_flags_on(la)]
    launches += attention_launches(dtypes=(bf, f32))
    launches += [la for la in attention_launches(dtypes=(f16,)) if la.constexprs["BLOCK_D"] == 128]
    unique = {}
    for la in launches:  # e.g. the coeffs kernel reads fp32 partials whatever the dtype: compiled once
        key = (la.kernel, tuple(_DTYPE[a.dtype] if isinstance(a, torch.Tensor) else type(a).__name__
                                for a in la.args), tuple(sorted(la.constexprs.items())))
        unique.setdefault(key, la)
    return list(unique.values())


def _compile_task(task):
    index, arch = task
    return compile_launch(all_launches()[index], arch)


def table(archs=(80, 90), jobs: int = 1) -> List[Compiled]:
    tasks = [(i, arch) for arch in archs for i in range(len(all_launches()))]
    if jobs <= 1:
        return [r for t in tasks for r in _compile_task(t)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return [r for rs in pool.map(_compile_task, tasks, chunksize=1) for r in rs]


def main() -> int:
    ap = argparse.ArgumentParser(description="Compile stg_ext's Triton kernels for sm_80/sm_90 and print "
                                 "registers, spills and shared memory per kernel")
    ap.add_argument("--arch", type=int, nargs="*", default=[80, 90])
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--csv", help="write every compiled variant here")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_compile: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    t0 = time.time()
    rows = table(tuple(args.arch), args.jobs)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kernel", "arch", "config", "registers", "spill_bytes", "stack", "shared"])
            for r in rows:
                w.writerow([r.kernel, f"sm_{r.arch}", r.config, r.registers, r.spill_bytes, r.stack, r.shared])
    # Summary: per kernel, arch and launch config, the variant count and the max registers / spills / shared memory.
    print("| kernel | launch config | arch | variants | registers (max) | spill + stack bytes (max) | shared memory, bytes (max) |")
    print("|---|---|---|---|---|---|---|")
    groups = {}
    for r in rows:
        cfg = " ".join(w for w in r.config.split() if w.split("=")[0] in
                       ("BLOCK", "BLOCK_N", "BLOCK_T", "BLOCK_D", "CHUNK", "warps", "stages", "DOT_F32"))
        groups.setdefault((r.kernel, cfg, r.arch), []).append(r)
    for (kernel, cfg, arch), rs in sorted(groups.items()):
        print(f"| {kernel} | {cfg} | sm_{arch} | {len(rs)} | {max(r.registers for r in rs)} | "
              f"{max(r.spill_bytes + r.stack for r in rs)} | {max(r.shared for r in rs)} |")
    print(f"({len(rows)} compiles in {time.time() - t0:.0f} s, {args.jobs} job(s))")
    return 1 if any(r.spill_bytes or r.stack for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
