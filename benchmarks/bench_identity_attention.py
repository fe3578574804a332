"""Benchmark of stg_ext.identity_joint_attention (STG-A on joint attention) on a Mochi-like shape, one run.

Columns (median ms per call):
  stg_ext_cpu        the "cpu" backend (C++ op): the N video queries, each against itself and the T text keys;
  eager_reference    stg_ext.ops.reference.identity_joint_attention_reference on the same inputs;
  joint_path         stg_ext.weak.identity_attention.joint_identity_sdpa: what the patched model runs for the whole
                     joint sequence (the op for the video queries + SDPA for the T text queries);
  sdpa_full_masked   what the model would do without the op: F.scaled_dot_product_attention over the joint
                     [video; text] sequence with a boolean mask (video rows: self + text keys; text rows: all),
                     O((N + T)^2 D);
and the ratios sdpa_full_masked / stg_ext_cpu, eager_reference / stg_ext_cpu, sdpa_full_masked / joint_path.
max_diff is the largest |stg_ext_cpu - sdpa_full_masked| over the video rows (a sanity check).

    python benchmarks/bench_identity_attention.py --out bench_out       # table on stdout, CSV in --out
    python benchmarks/bench_identity_attention.py --n 4096 --quick      # smaller N, fewer repeats
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import stg_ext
from stg_ext.weak.adapters.base import JointLayout
from stg_ext.weak.identity_attention import joint_identity_sdpa
from stg_ext.ops.reference import identity_joint_attention_reference

from _timing import median_seconds, write_csv

# Mochi-1: 24 heads of 128, 256 text tokens (padded; ~128 real in typical prompts); N video tokens.
HEADS, HEAD_DIM, TEXT = 24, 128, 128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_joint(n: int, t: int, dtype: torch.dtype, heads: int = HEADS, d: int = HEAD_DIM, seed: int = 0):
    """q, k, v of the joint (1, heads, n + t, d) sequence [video; text]."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n + t, d, generator=gen).to(dtype) for _ in range(3)]


def joint_mask(n: int, t: int) -> torch.Tensor:
    """(n + t, n + t) boolean SDPA mask: video query i sees video key i and every text key; text sees all."""
    mask = torch.zeros(n + t, n + t, dtype=torch.bool)
    mask[:n, n:] = True
    mask[torch.arange(n), torch.arange(n)] = True
    mask[n:] = True
    return mask


def candidates(q, k, v, n: int) -> Dict[str, Callable[[], torch.Tensor]]:
    video, text = slice(0, n), slice(n, q.shape[-2])
    args = (q[:, :, video], k[:, :, video], v[:, :, video], k[:, :, text], v[:, :, text])
    scale = q.shape[-1] ** -0.5
    mask = joint_mask(n, q.shape[-2] - n)
    out = {
        "eager_reference": lambda: identity_joint_attention_reference(*args, None, scale),
        "sdpa_full_masked": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
    }
    if "cpu" in stg_ext.available_backends("cpu"):
        out["stg_ext_cpu"] = lambda: stg_ext.identity_joint_attention(*args, scale=scale, backend="cpu")
        out["joint_path"] = lambda: joint_identity_sdpa(q, k, v, None, scale, n, JointLayout(video_first=True))
    return out


COLUMNS = ["dtype", "N", "T", "stg_ext_cpu_ms", "eager_reference_ms", "joint_path_ms", "sdpa_full_masked_ms",
           "sdpa_over_cpu", "reference_over_cpu", "sdpa_over_joint_path", "max_diff"]


def format_row(row: dict) -> str:
    return " | ".join(f"{row.get(c, '-')!s:>{max(len(c), 6)}}" for c in COLUMNS)


def run(n: int, t: int, repeats: int, sdpa_repeats: int, dtypes: List[str]) -> List[dict]:
    rows = []
    for dname in dtypes:
        q, k, v = make_joint(n, t, DTYPES[dname])
        fns = candidates(q, k, v, n)
        times = {}
        for name, fn in fns.items():
            slow = name == "sdpa_full_masked"
            times[name] = median_seconds(fn, sdpa_repeats if slow else repeats, warmup=0 if slow else 1)
        row = {"model": "mochi-like", "dtype": dname, "B": 1, "H": q.shape[1], "N": n, "T": t, "D": q.shape[-1],
               "threads": torch.get_num_threads()}
        row.update({f"{name}_ms": round(s * 1e3, 1) for name, s in times.items()})
        if "stg_ext_cpu" in times:
            row["sdpa_over_cpu"] = round(times["sdpa_full_masked"] / times["stg_ext_cpu"], 1)
            row["reference_over_cpu"] = round(times["eager_reference"] / times["stg_ext_cpu"], 2)
            row["sdpa_over_joint_path"] = round(times["sdpa_full_masked"] / times["joint_path"], 1)
            diff = (fns["stg_ext_cpu"]().float() - fns["sdpa_full_masked"]()[:, :, :n].float()).abs().max()
            row["max_diff"] = f"{diff.item():.1e}"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out", help="folder for identity_attention.csv")
    parser.add_argument("--n", type=int, default=10240, help="video tokens N (default 10240, Mochi-like)")
    parser.add_argument("--t", type=int, default=TEXT, help="text tokens T (default 128)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of the fast candidates (median)")
    parser.add_argument("--sdpa-repeats", type=int, default=2, help="timed calls of the full masked SDPA")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--quick", action="store_true", help="3 repeats and 1 SDPA repeat")
    args = parser.parse_args(argv)
    repeats, sdpa_repeats = (3, 1) if args.quick else (args.repeats, args.sdpa_repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, stg_ext backends "
          f"{stg_ext.available_backends('cpu')}; B=1 H={HEADS} N={args.n} T={args.t} D={HEAD_DIM}")
    print(" | ".join(f"{c:>{max(len(c), 6)}}" for c in COLUMNS))
    rows = run(args.n, args.t, repeats, sdpa_repeats, args.dtypes.split(","))
    write_csv(rows, args.out, "identity_attention.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
