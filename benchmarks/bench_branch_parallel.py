"""Branch parallelism (issue 14): per-rank passes, step time and bytes sent per step for 1, 2 and 3 ranks, measured in
one run, and what that traffic would cost for Wan 14B shapes on NVLink and on 100 Gb/s Ethernet (calculated).

One group of 3 gloo CPU processes (one torch thread each) runs a stock WanPipeline (separate cond/uncond calls)
whose transformer has the Wan 1.3B geometry of bench_step_cost.py (30 blocks, width 128 = 4 heads x 32, 1024 video
tokens; random weights), STG-A at layer 8 (the perturbed suffix is 22/30 of a pass), CFG 4.5. Configurations, timed
in interleaved rounds (one run of each per round, medians over rounds):
  1 rank    CFG alone, and STG on one process (rank 0 alone; the others wait at a barrier)
  2 ranks   STG with process_group=[0, 1], placement auto (= perturbed suffix on the cond rank), stash, full
  3 ranks   STG with process_group=[0, 1, 2], placement auto (= perturbed pass in full on rank 2), stash, cond
Per rank: the passes it runs per step (from the split; a suffix counts 22/30), its CPU time per step (thread time
of the rank's one compute thread), bytes sent per step; per configuration: the wall time per step (the slowest
rank). The machine has 2 cores: 3 single-threaded ranks share them, so the 3-rank wall times are bounded by the
cores, not by the split; the per-rank CPU times show the split.

    python benchmarks/bench_branch_parallel.py --out bench_out            # ~3-5 minutes here
    python benchmarks/bench_branch_parallel.py --quick                    # 1 round, 1 step
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(__file__))

from _timing import write_csv  # noqa: E402

LAYER, MODE, CFG_SCALE = 8, "attention", 4.5
SIGMA = (30 - LAYER) / 30  # the perturbed suffix's share of a pass
CONFIGS = [  # (name, ranks, placement or None for CFG)
    ("1 rank, CFG", 1, None), ("1 rank, STG", 1, "single"),
    ("2 ranks, auto (cond)", 2, "auto"), ("2 ranks, stash", 2, "stash"), ("2 ranks, full", 2, "full"),
    ("3 ranks, auto (full)", 3, "auto"), ("3 ranks, stash", 3, "stash"), ("3 ranks, cond", 3, "cond"),
]


def _pipeline():
    import torch
    from diffusers import WanTransformer3DModel

    from stg_ext.testing.tiny import tiny_pipeline

    tp = tiny_pipeline("wan", vae=False)
    torch.manual_seed(0)
    big = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4,
                                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=512, num_layers=30,
                                rope_max_seq_len=64).eval()
    tp.pipe.register_modules(transformer=big)
    return tp


def worker(rank: int, world: int, rounds: int, steps: int) -> Dict:
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist

    import stg_ext

    tp = _pipeline()
    groups = {1: None, 2: dist.new_group([0, 1]), 3: dist.group.WORLD}
    results: Dict[str, List[dict]] = {name: [] for name, _, _ in CONFIGS}

    def one(name, ranks, placement):
        if rank >= ranks:
            return None
        kw = tp.call_kwargs(steps=steps, height=256, width=256, num_frames=13)
        handle = None
        if placement == "single":
            handle = stg_ext.apply_stg(tp.pipe, LAYER, MODE)
        elif placement is not None:
            handle = stg_ext.apply_stg(tp.pipe, LAYER, MODE, process_group=groups[ranks], branch_placement=placement)
        try:
            t0, c0 = time.perf_counter(), time.thread_time()
            with torch.no_grad():
                tp.pipe(**kw)
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            recs = handle.branch_group.records if handle is not None and getattr(handle, "branch_group", None) else []
        finally:
            if handle is not None:
                handle.remove()
        per_step = [r for r in recs if r.role != "cond" or not any(q.role == "uncond" for q in recs)]
        return dict(wall=wall / steps, cpu=cpu / steps,
                    passes=statistics.fmean(r.passes for r in per_step) if per_step else None,
                    tasks=" ".join(per_step[0].tasks) if per_step else "",
                    sent=statistics.fmean(r.sent_bytes for r in per_step) if per_step else 0.0)

    for r in range(rounds + 1):  # round 0: warm-up
        for name, ranks, placement in CONFIGS:
            dist.barrier()
            out = one(name, ranks, placement)
            dist.barrier()
            if r and out is not None:
                results[name].append(out)
    return results


def wan14b_traffic() -> List[dict]:
    """Bytes per step for Wan 2.1 14B at 1280x720, 81 frames (bf16), and their transfer times (calculated)."""
    frames, h, w = 21, 90, 160                 # latent frames, latent height/width (VAE 4x temporal, 8x spatial)
    channels, dim, blocks, ffn = 16, 5120, 40, 13824
    tokens = frames * (h // 2) * (w // 2)       # patch (1, 2, 2): 75600
    pred = channels * frames * h * w * 2        # one prediction, bf16
    stash = tokens * dim * 2                    # block l's hidden states, bf16 (Wan's blocks carry one stream)
    # FLOPs of one pass: per block self-attention 4 N^2 d, projections 8 N d^2 (self) + 4 N d^2 (cross, text 512
    # tokens: small), FFN 4 N d ffn.
    flops = blocks * (4 * tokens ** 2 * dim + 12 * tokens * dim ** 2 + 4 * tokens * dim * ffn)
    pass_s = flops / 400e12                     # an H100 at ~400 TFLOP/s sustained in bf16 (~40% of peak)
    links = {"NVLink (H100, ~350 GB/s per direction achieved)": 350e9, "100 Gb/s Ethernet (12.5 GB/s)": 12.5e9}
    rows = []
    for label, nbytes in (("2 ranks auto: u one way, c + p the other (3 predictions)", 3 * pred),
                          ("3 ranks auto (full): 6 prediction transfers", 6 * pred),
                          ("stash placement: + block l's hidden states", stash)):
        row = dict(traffic=label, MB=round(nbytes / 1e6, 1))
        for link, bw in links.items():
            ms = nbytes / bw * 1e3
            row[link] = f"{ms:.2f} ms ({100 * ms / 1e3 / pass_s:.3f}% of a pass)"
        rows.append(row)
    rows.append(dict(traffic=f"one forward pass (estimate: {flops / 1e15:.1f} PFLOP at 400 TFLOP/s)",
                     MB="", **{link: f"{pass_s:.1f} s" for link in links}))
    return rows


def main(argv: Optional[List[str]] = None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder for branch_parallel.csv")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 round, 1 step")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 1
    from stg_ext.testing.distributed import run_group

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    per_rank = run_group(worker, 3, args.rounds, args.steps, timeout=3600)
    print(f"# {time.perf_counter() - t0:.0f} s, {args.rounds} rounds x {args.steps} steps; load average "
          f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores)")
    cfg_wall = statistics.median(x["wall"] for x in per_rank[0]["1 rank, CFG"])
    pass_cpu = statistics.median(x["cpu"] for x in per_rank[0]["1 rank, CFG"]) / 2  # CFG = 2 passes
    rows = []
    for name, ranks, placement in CONFIGS:
        walls = [max(per_rank[r][name][i]["wall"] for r in range(ranks)) for i in range(args.rounds)]
        wall = statistics.median(walls)
        # The critical path with one core per rank: the slowest rank's compute time per step (CPU time).
        busiest = max(statistics.median(x["cpu"] for x in per_rank[r][name]) for r in range(ranks))
        row = dict(config=name, step_ms=round(1e3 * wall, 1), vs_cfg_1rank=round(wall / cfg_wall, 3),
                   busiest_rank_cpu_ms=round(1e3 * busiest, 1),
                   busiest_vs_cfg_1rank=round(busiest / (2 * pass_cpu), 3))
        for r in range(3):
            runs = per_rank[r][name]
            if not runs:
                row[f"rank{r}"] = "-"
                continue
            cpu = statistics.median(x["cpu"] for x in runs)
            planned = runs[0]["passes"]
            planned = planned if planned is not None else (2.0 if placement is None else 2.0 + SIGMA)
            row[f"rank{r}"] = (f"{runs[0]['tasks'] or ('u c' if placement is None else 'u c p')}; "
                               f"passes {round(planned, 3)}; cpu {1e3 * cpu:.0f} ms = {cpu / pass_cpu:.2f} passes; "
                               f"sent {runs[0]['sent'] / 1e3:.0f} kB")
        rows.append(row)
    header = ["config", "step_ms", "vs_cfg_1rank", "busiest_rank_cpu_ms", "busiest_vs_cfg_1rank", "rank0", "rank1",
              "rank2"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    print()
    traffic = wan14b_traffic()
    theader = list(traffic[0])
    print("| " + " | ".join(theader) + " |")
    print("|" + "---|" * len(theader))
    for row in traffic:
        print("| " + " | ".join(str(row[h]) for h in theader) + " |")
    if args.out:
        write_csv(rows, args.out, "branch_parallel.csv")
        write_csv(traffic, args.out, "branch_parallel_wan14b_traffic.csv")
    return rows


if __name__ == "__main__":
    main()
