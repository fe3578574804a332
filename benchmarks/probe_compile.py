"""Graph breaks and graphs of a compiled denoiser under STG (issue 12), read from dynamo's counters.

For each family, compile way (whole: `transformer.compile()`; regional: `compile_repeated_blocks(fullgraph=True)`
where the family defines repeated blocks, else each block compiled) and STG mode: the stock pipeline runs twice,
then STG at `--layer` runs 3 steps, then 4 steps with scale 2 and a window (stop 0.5), then 5 steps with rescale
0.7 (each run re-applies STG with the new settings, as a user would). After each run the cumulative counts of
`torch._dynamo.utils.counters`: graph breaks (with their reasons) and unique graphs. A row that grows after the
first STG run has recompiled.

    python benchmarks/probe_compile.py                          # tiny pipelines, 5 families, backend "eager"
    python benchmarks/probe_compile.py --families wan --issue-geometry   # issue 12's Wan: 16 blocks of width 128,
                                                                # 1280 video tokens, layer 10, 6 steps

The counts are dynamo's: the backend ("eager" by default, fast) does not change them.
"""
from __future__ import annotations

import argparse
import warnings
from typing import Dict, List, Optional

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

from _timing import write_csv
from bench_step_cost import compile_model

FAMILIES = ("wan", "ltx", "cogvideox", "hunyuan_video", "mochi")
# (steps, apply_stg settings) of the runs after the first STG run
LATER = ((4, dict(scale=2.0, stop=0.5)), (5, dict(rescale=0.7)))


def issue_geometry_wan(tp) -> dict:
    """Issue 12's Wan denoiser in the tiny Wan pipeline (its 4-channel latent space): 16 blocks of width 128,
    latents 5 x 32 x 32 (1280 tokens after the 1x2x2 patch). Returns the call's size overrides."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    tp.pipe.transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=512, num_layers=16, rope_max_seq_len=64).eval()
    return dict(height=32 * tp.pipe.vae_scale_factor_spatial, width=32 * tp.pipe.vae_scale_factor_spatial,
                num_frames=4 * tp.pipe.vae_scale_factor_temporal + 1)


def counts() -> Dict[str, object]:
    return dict(breaks=sum(counters["graph_break"].values()), graphs=counters["stats"]["unique_graphs"],
                reasons=sorted(counters["graph_break"]))


def probe(family: str, how: str, mode: str, layer: int, steps: int, backend: str, issue_geometry: bool) -> dict:
    torch._dynamo.reset()
    counters.clear()
    tp = tiny_pipeline(family, vae=False)
    sizes = issue_geometry_wan(tp) if issue_geometry else {}
    compile_model(tp.pipe.transformer, how, backend, fullgraph=True)

    def run(n: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tp.pipe(**tp.call_kwargs(steps=n, **sizes))

    run(steps)
    run(steps + 1)
    stock = counts()
    row = dict(family=family + ("@issue12" if issue_geometry else ""), compile=how, mode=mode,
               stock_breaks=stock["breaks"], stock_graphs=stock["graphs"])
    stg_ext.apply_stg(tp.pipe, layer, mode)
    run(steps)
    after = [counts()]
    for n, settings in LATER:
        stg_ext.apply_stg(tp.pipe, layer, mode, **settings)
        run(n + steps - 3)
        after.append(counts())
    stg_ext.remove_stg(tp.pipe)
    row["stg_breaks"] = [c["breaks"] - stock["breaks"] for c in after]
    row["stg_graphs"] = [c["graphs"] for c in after]
    row["new_break_reasons"] = sorted(set(after[-1]["reasons"]) - set(stock["reasons"]))
    return row


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--compile", nargs="+", default=["whole", "regional"], choices=["whole", "regional"])
    parser.add_argument("--modes", nargs="+", default=["attention", "residual"], choices=["attention", "residual"])
    parser.add_argument("--backend", default="eager", help="torch.compile backend (default: eager)")
    parser.add_argument("--issue-geometry", action="store_true", help="Wan only: issue 12's geometry")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    if args.issue_geometry and args.families != ["wan"]:
        parser.error("--issue-geometry is Wan's: use --families wan")
    layer, steps = (10, 6) if args.issue_geometry else (1, 3)
    rows = []
    for family in args.families:
        for how in args.compile:
            for mode in args.modes:
                row = probe(family, how, mode, layer, steps, args.backend, args.issue_geometry)
                print(f"{row['family']:>14} {how:>8} {mode:>9}  stock: {row['stock_breaks']} breaks, "
                      f"{row['stock_graphs']} graphs  STG runs: +{row['stg_breaks']} breaks, graphs {row['stg_graphs']}"
                      f"  new break reasons: {row['new_break_reasons'] or 'none'}", flush=True)
                rows.append(row)
    write_csv(rows, args.out, "probe_compile.csv")
    return rows


if __name__ == "__main__":
    main()
