"""Benchmark of stg_ext.combine (CFG + STG + rescale 0.7) on real latent shapes, measured in one run.

Columns: the "cpu" backend (C++ op), the eager PyTorch reference, torch.compile of the reference, and the
memory-bound floor: one torch.add pass over the same number of bytes as one read of c, u, p and one write.
The candidates are timed in turn, one call each per round, so that a load change on the machine hits all of
them alike; `vs_compiled_iqr` is the interquartile range of the per-round ratios compiled / cpu.

    python benchmarks/bench_combine.py --out bench_out          # table on stdout, CSV (+ PNG if matplotlib)
    python benchmarks/bench_combine.py --quick                  # smaller repeat counts
    python benchmarks/bench_combine.py --threads 1 2            # one table per torch thread count
    python benchmarks/bench_combine.py --device cuda            # cuda / triton backends, CUDA-event timing;
                                                                # floor = bytes moved / peak DRAM bandwidth
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch._dynamo

import stg_ext
from stg_ext.ops.reference import combine_reference

from _timing import write_csv

LATENT_SHAPES = {
    "mochi": (1, 12, 28, 60, 106),
    "ltx-video-2b": (1, 128, 21, 16, 24),
    "wan-1.3b": (1, 16, 21, 60, 104),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CFG_SCALE, STG_SCALE, RESCALE = 4.5, 1.0, 0.7


def make_latents(shape, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=gen).to(dtype)
    out = c, (c.float() + 0.3 * torch.randn(shape, generator=gen)).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    return tuple(t.to(device) for t in out)


def peak_bandwidth(device) -> float:
    """Bytes/s of the device's DRAM from its clock and bus width (double data rate), or 0 if unknown."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


def candidates(c, p, u) -> Dict[str, Callable[[], object]]:
    if c.is_cuda:
        return cuda_candidates(c, p, u)
    def eager():
        return combine_reference(c, [p], u, CFG_SCALE, [STG_SCALE], RESCALE, False, False)

    compiled_ref = torch.compile(combine_reference, dynamic=False)

    def compiled():
        return compiled_ref(c, [p], u, CFG_SCALE, [STG_SCALE], RESCALE, False, False)

    # The floor: one elementwise pass moving as many bytes as reading c, u, p and writing f once.
    n_floor = math.ceil(4 * c.numel() / 3)
    a, b = torch.empty(n_floor, dtype=c.dtype).normal_(), torch.empty(n_floor, dtype=c.dtype).normal_()
    floor_out = torch.empty_like(a)

    out = {
        "torch_add_floor": lambda: torch.add(a, b, out=floor_out),
        "eager_reference": eager,
        "compiled_reference": compiled,
    }
    if "cpu" in stg_ext.available_backends("cpu"):
        out["stg_ext_cpu"] = lambda: stg_ext.combine(c, p, u, cfg_scale=CFG_SCALE, stg_scale=STG_SCALE,
                                                     rescale=RESCALE, backend="cpu")
    return out


def cuda_candidates(c, p, u) -> Dict[str, Callable[[], object]]:
    def eager():
        return combine_reference(c, [p], u, CFG_SCALE, [STG_SCALE], RESCALE, False, False)

    compiled_ref = torch.compile(combine_reference, dynamic=False)
    out = {"eager_reference": eager,
           "compiled_reference": lambda: compiled_ref(c, [p], u, CFG_SCALE, [STG_SCALE], RESCALE, False, False)}
    for backend in ("cuda", "triton"):
        if backend in stg_ext.available_backends("cuda"):
            out[f"stg_ext_{backend}"] = (lambda b=backend: stg_ext.combine(
                c, p, u, cfg_scale=CFG_SCALE, stg_scale=STG_SCALE, rescale=RESCALE, backend=b))
    return out


def cuda_seconds(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int) -> Dict[str, List[float]]:
    """Per-call device times (CUDA events), candidates interleaved per round as on the CPU."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3)
    return times


def interleaved_seconds(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int) -> Dict[str, List[float]]:
    """Wall times of `repeats` rounds, each calling every candidate once, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def quartiles(xs: List[float]):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def run(repeats: int, device: str = "cpu") -> List[dict]:
    rows = []
    for model, shape in LATENT_SHAPES.items():
        for dname, dtype in DTYPES.items():
            c, p, u = make_latents(shape, dtype, device=device)
            # A fresh dynamo cache per (shape, dtype, thread count): one compiled reference for all of them would
            # reach dynamo's recompile limit (8) after eight and then run eagerly, unreported.
            torch._dynamo.reset()
            fns = candidates(c, p, u)
            timer = cuda_seconds if c.is_cuda else interleaved_seconds
            samples = timer(fns, repeats, warmup=2)
            times = {name: statistics.median(ts) for name, ts in samples.items()}
            row = {"model": model, "shape": "x".join(map(str, shape)), "dtype": dname, "device": device,
                   "threads": torch.get_num_threads()}
            row.update({f"{k}_ms": round(v * 1e3, 3) for k, v in times.items()})
            if c.is_cuda:
                # The floor: reading c, u, p twice (rescale's reduction, then the write) and writing f once,
                # at the device's peak DRAM bandwidth.
                bw = peak_bandwidth(c.device)
                if bw > 0:
                    row["memory_floor_ms"] = round(7 * c.numel() * c.element_size() / bw * 1e3, 4)
                for b in ("cuda", "triton"):
                    if f"stg_ext_{b}" in times and bw > 0:
                        row[f"{b}_x_floor"] = round(times[f"stg_ext_{b}"] * 1e3 / row["memory_floor_ms"], 2)
            if "stg_ext_cpu" in times:
                row["speedup_vs_eager"] = round(times["eager_reference"] / times["stg_ext_cpu"], 2)
                row["speedup_vs_compiled"] = round(times["compiled_reference"] / times["stg_ext_cpu"], 2)
                lo, hi = quartiles([a / b for a, b in zip(samples["compiled_reference"], samples["stg_ext_cpu"])])
                row["vs_compiled_iqr"] = f"{lo:.2f}-{hi:.2f}"
                row["x_floor"] = round(times["stg_ext_cpu"] / times["torch_add_floor"], 2)
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


COLUMNS = ["model", "dtype", "threads", "stg_ext_cpu_ms", "eager_reference_ms", "compiled_reference_ms", "torch_add_floor_ms",
           "speedup_vs_eager", "speedup_vs_compiled", "vs_compiled_iqr", "x_floor"]


def format_row(row: dict) -> str:
    return " | ".join(f"{row.get(c, '-')!s:>{max(len(c), 8)}}" for c in COLUMNS)


def write_outputs(rows: List[dict], out_dir: str) -> None:
    write_csv(rows, out_dir, "combine.csv")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    labels = [f"{r['model']}\n{r['dtype']} {r['threads']}t" for r in rows]
    series = ["stg_ext_cpu_ms", "compiled_reference_ms", "eager_reference_ms", "torch_add_floor_ms"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        ax.bar([x + i * width for x in range(len(rows))], [r.get(name, 0) for r in rows], width, label=name[:-3])
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels)
    ax.set_ylabel("ms per call (median)")
    ax.set_title("stg_ext.combine: CFG + STG + rescale 0.7")
    ax.legend()
    fig.tight_layout()
    png = os.path.join(out_dir, "combine.png")
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out", help="folder for combine.csv (and combine.png)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement (median reported)")
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of --repeats")
    parser.add_argument("--threads", type=int, nargs="*", help="torch thread counts to run (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    global COLUMNS
    if args.device == "cuda":
        COLUMNS = ["model", "dtype", "stg_ext_cuda_ms", "stg_ext_triton_ms", "eager_reference_ms",
                   "compiled_reference_ms", "memory_floor_ms", "cuda_x_floor", "triton_x_floor"]
    rows = []
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, stg_ext backends "
              f"{stg_ext.available_backends(args.device)}")
        print(" | ".join(f"{c:>{max(len(c), 8)}}" for c in COLUMNS))
        rows += run(5 if args.quick else args.repeats, args.device)
    write_outputs(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
