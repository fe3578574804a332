"""`stg-ext sweep MODEL --layers 0:48`: the paper's layer selection (appendix A3), scored without a network."""
from __future__ import annotations

import argparse
import csv
import logging
import statistics
import textwrap
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from .. import options
from ..distributed_jobs import JobGroup
from ..errors import CLIError, UsageError
from ..loading import Model, load_model
from ...video_metrics import flow_method, video_metrics
from ..progress import progress_bar
from ..prompts import builtin_help, load_prompts
from ..render import STGSettings, check_stg, render
from ..video import ensure_writable_dir, write_video

logger = logging.getLogger("stg_ext.cli")

RULE = ("best layer = the lowest mean rank over four criteria, each ranked across the candidate layers (ties share "
        "the mean rank): temporal_flicker (higher is better), dynamic_degree then motion (higher is better), "
        "sharpness (higher is better), saturation_shift = mean |saturation - CFG's saturation| on the same prompt and "
        "seed (lower is better: over-saturation is STG's known failure, paper Fig. 9); a tie in mean rank goes to "
        "the later layer (appendix A3: later layers tend to do better)")

HELP = "the paper's layer selection (A3): score every candidate layer with model-free video statistics"
DESCRIPTION = f"""\
Renders every candidate layer (--layers) with STG on a fixed prompt list and seeds, plus plain CFG on the
same prompts and seeds, and scores each video with model-free statistics (stg_ext/video_metrics.py):

  temporal_flicker  VBench's temporal flickering score: (255 - mean |frame[i+1] - frame[i]|) / 255
  dynamic_degree    VBench's dynamic degree: the share of videos whose optical flow (OpenCV Farneback; a
                    normal-flow estimate without OpenCV) moves enough; motion is the mean top-5% flow in
                    pixels at a 256-pixel short side
  saturation        mean HSV saturation; saturation_shift is its distance to CFG's on the same prompt/seed
  sharpness         variance of the Laplacian of the grey frames

{textwrap.fill("Rule: " + RULE + ".", 104)}

Writes to --out: sweep.csv (one row per layer, CFG first; the rule is its first line, a '#' comment),
runs.csv (one row per video), sweep.png (each statistic against the layer; matplotlib), and with
--save-videos every video under videos/. Prints the table and the best layer.

Example (Mochi, the paper's sweep over its later layers, STG-R):
  stg-ext sweep genmo/mochi-1-preview --layers 28:48:2 --mode residual --prompts curated --num-prompts 4 \\
      --seeds 0,1 --steps 64 --dtype bfloat16 --offload model --out mochi_sweep

Across processes (the renders split round-robin, rank 0 writes the same files):
  torchrun --standalone --nproc-per-node 2 -m stg_ext sweep tiny:wan --layers 0:3 --out wan_sweep"""

STAT_COLUMNS = ("temporal_flicker", "dynamic_degree", "motion", "saturation", "saturation_shift", "sharpness")
RANK_COLUMNS = ("rank_flicker", "rank_dynamic", "rank_sharpness", "rank_saturation_shift")

LayerItem = Union[int, str]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    p.add_argument("--layers", default="all",
                   help="candidate layers: 'all', a range start:stop[:step] (stop excluded, like Python), indices, "
                        "module paths, or a comma-separated mix, e.g. 0:48, 28:48:2, 30,32,34 (default: all)")
    options.add_sampling(p, steps=30, seed=False, prompt=False)
    group = p.add_argument_group("prompts and seeds")
    group.add_argument("--prompts", default="curated",
                       help=f"a shipped prompt list or a prompt file, one prompt per line ({builtin_help()}) "
                            "(default: %(default)s)")
    group.add_argument("--prompt", action="append", default=[], dest="prompt_texts", metavar="TEXT",
                       help="a prompt, repeatable; replaces --prompts")
    group.add_argument("--num-prompts", type=options.positive_int, default=2,
                       help="use the first N prompts of the list (default: %(default)s)")
    group.add_argument("--seeds", type=options.int_list, default=[0],
                       help="seeds, e.g. 0,1,2 or 0:3 (default: 0)")
    options.add_stg(p, layer=False)
    group = p.add_argument_group("output")
    group.add_argument("--out", default="stg_ext_sweep", help="folder to write into (default: %(default)s)")
    group.add_argument("--save-videos", action="store_true", help="also write every rendered video under videos/")
    options.add_common(p)
    p.set_defaults(run=run)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------

def parse_layers(text: str, num_layers: int) -> List[LayerItem]:
    """The candidate layers of `--layers`, each once, in the order given; indices made non-negative."""
    if text.strip() == "all":
        return list(range(num_layers))
    out: List[LayerItem] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise UsageError(f"--layers {text!r}: empty item")
        if ":" in part:
            try:
                bounds = [int(b) if b else None for b in part.split(":")]
            except ValueError:
                raise UsageError(f"--layers {text!r}: {part!r} is not a range start:stop[:step]") from None
            if len(bounds) > 3:
                raise UsageError(f"--layers {text!r}: {part!r} is not a range start:stop[:step]")
            start, stop, step = (bounds + [None, None])[:3]
            if stop is not None and stop > num_layers:
                raise UsageError(f"--layers {part}: the model has {num_layers} layers (0..{num_layers - 1})")
            out.extend(range(num_layers)[slice(start, stop, step)])
            continue
        try:
            index = int(part)
        except ValueError:
            out.append(part)  # a module path, checked when STG is applied
            continue
        if not -num_layers <= index < num_layers:
            raise UsageError(f"--layers: layer {index} is out of range: the model has {num_layers} layers "
                             f"(0..{num_layers - 1})")
        out.append(index % num_layers)
    unique = list(dict.fromkeys(out))
    if not unique:
        raise UsageError(f"--layers {text!r} names no layer")
    return unique


# --------------------------------------------------------------------------------------------------
# Scores and the rule
# --------------------------------------------------------------------------------------------------

def average_ranks(keys: Sequence, higher_is_better: bool) -> List[float]:
    """1 = best; tied keys share the mean of their ranks."""
    order = sorted(range(len(keys)), key=lambda i: keys[i], reverse=higher_is_better)
    ranks = [0.0] * len(keys)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and keys[order[j + 1]] == keys[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def summarize(runs: List[dict], layers: Sequence[LayerItem]) -> Tuple[List[dict], LayerItem]:
    """One row per layer ("cfg" first) with mean statistics, the ranks and the best layer (RULE)."""
    cfg_sat = {(r["prompt_index"], r["seed"]): r["saturation"] for r in runs if r["layer"] == "cfg"}
    rows = []
    for layer in ["cfg", *layers]:
        mine = [r for r in runs if r["layer"] == layer]
        row = dict(layer=layer, videos=len(mine),
                   temporal_flicker=statistics.fmean(r["temporal_flicker"] for r in mine),
                   dynamic_degree=statistics.fmean(r["dynamic"] for r in mine),
                   motion=statistics.fmean(r["motion"] for r in mine),
                   saturation=statistics.fmean(r["saturation"] for r in mine),
                   saturation_shift=statistics.fmean(abs(r["saturation"] - cfg_sat[(r["prompt_index"], r["seed"])])
                                                     for r in mine),
                   sharpness=statistics.fmean(r["sharpness"] for r in mine),
                   seconds=statistics.fmean(r["seconds"] for r in mine))
        rows.append(row)
    candidates = rows[1:]
    criteria = [("rank_flicker", [r["temporal_flicker"] for r in candidates], True),
                ("rank_dynamic", [(r["dynamic_degree"], r["motion"]) for r in candidates], True),
                ("rank_sharpness", [r["sharpness"] for r in candidates], True),
                ("rank_saturation_shift", [r["saturation_shift"] for r in candidates], False)]
    for column, keys, higher in criteria:
        for row, rank in zip(candidates, average_ranks(keys, higher)):
            row[column] = rank
    for row in candidates:
        row["mean_rank"] = statistics.fmean(row[c] for c in RANK_COLUMNS)
    # Lowest mean rank; among equals the later layer (position in the candidate list, as given).
    best_pos = min(range(len(candidates)), key=lambda i: (candidates[i]["mean_rank"], -i))
    for i, row in enumerate(candidates):
        row["best"] = int(i == best_pos)
    return rows, candidates[best_pos]["layer"]


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    out = ensure_writable_dir(args.out)
    prompts = args.prompt_texts or load_prompts(args.prompts)[:args.num_prompts]
    model = load_model(args.model, options.load_options(args))
    if not model.takes_prompt:
        logger.info("%s takes no text prompt: each prompt index draws its own conditioning from the seed",
                    args.model)
    layers = parse_layers(args.layers, model.num_layers())
    base = options.stg_settings(args, layers[0])
    settings = {layer: STGSettings(layer, base.mode, base.scale, base.rescale, base.start, base.stop)
                for layer in layers}
    for s in settings.values():
        check_stg(model.pipe, s)  # every candidate, before the first render
    extra = options.sampling_kwargs(args)
    if args.save_videos:
        ensure_writable_dir(out / "videos")

    # Under torchrun the jobs are split over the processes and rank 0 writes the files (distributed_jobs.py).
    with JobGroup() as jobs_group:
        jobs = [(p_index, prompt, seed, layer) for p_index, prompt in enumerate(prompts) for seed in args.seeds
                for layer in ["cfg", *layers]]
        mine = jobs_group.mine(jobs)
        done = []
        with progress_bar(total=len(mine), desc="sweep", disable=args.quiet, unit="video") as bar:
            for job_index, (p_index, prompt, seed, layer) in mine:
                bar.set_postfix_str(f"prompt {p_index} seed {seed} {'CFG' if layer == 'cfg' else f'layer {layer}'}")
                kwargs = _kwargs(model, prompt, p_index, seed, args, extra)
                result = render(model, kwargs, None if layer == "cfg" else settings[layer], progress=False)
                row = dict(layer=layer, prompt_index=p_index, seed=seed, prompt=prompt,
                           **video_metrics(result.frames), seconds=result.seconds, frames=len(result.frames),
                           height=result.frames.shape[1], width=result.frames.shape[2])
                if args.save_videos:
                    name = f"p{p_index}_s{seed}_{'cfg' if layer == 'cfg' else f'layer{layer}'}.mp4"
                    row["video"] = str(write_video(out / "videos" / name, result.frames, args.fps))
                done.append((job_index, row))
                bar.update()
        runs: List[dict] = jobs_group.gather(done)
        if not jobs_group.is_main:
            return 0

    rows, best = summarize(runs, layers)
    method = flow_method()
    written = [_write_runs(out / "runs.csv", runs, method), _write_summary(out / "sweep.csv", rows, method)]
    plot = _plot(out / "sweep.png", rows, best, args)
    if plot is not None:
        written.append(plot)
    print(_table(rows))
    print(f"best layer: {best} ({base.describe().split(' layer ')[0]}, scale {args.scale}); rule: lowest mean rank, "
          "see sweep.csv")
    for path in written:
        print(f"wrote {path}")
    return 0


def _kwargs(model: Model, prompt: str, p_index: int, seed: int, args: argparse.Namespace, extra: dict) -> dict:
    if model.takes_prompt:
        return model.call_kwargs(prompt=prompt, seed=seed, steps=args.steps, **extra)
    # No text encoder (tiny families without one): distinct prompts get distinct random conditioning.
    return model.call_kwargs(prompt=None, seed=seed + 1000 * p_index, steps=args.steps, **extra)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _write_csv(path: Path, fields: List[str], rows: List[dict], comment: Optional[str] = None) -> Path:
    try:
        with open(path, "w", newline="") as fh:
            if comment:
                fh.write(f"# {comment}\n")
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(row.get(k, "")) for k in fields})
    except OSError as e:
        raise CLIError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return path


def _write_runs(path: Path, runs: List[dict], method: str) -> Path:
    fields = ["layer", "prompt_index", "seed", "temporal_flicker", "dynamic", "motion", "saturation", "sharpness",
              "seconds", "frames", "height", "width", "prompt"] + (["video"] if runs and "video" in runs[0] else [])
    return _write_csv(path, fields, runs, comment=f"one row per video; flow: {method}")


def _write_summary(path: Path, rows: List[dict], method: str) -> Path:
    fields = ["layer", "videos", *STAT_COLUMNS, "seconds", *RANK_COLUMNS, "mean_rank", "best"]
    return _write_csv(path, fields, rows, comment=f"{RULE}; flow: {method}")


def _table(rows: List[dict]) -> str:
    head = ["layer", "flicker", "dynamic", "motion", "saturation", "sat.shift", "sharpness", "mean rank", ""]
    cells = [head]
    for r in rows:
        cells.append([str(r["layer"]), f"{r['temporal_flicker']:.4f}", f"{r['dynamic_degree']:.2f}",
                      f"{r['motion']:.2f}", f"{r['saturation']:.4f}", f"{r['saturation_shift']:.4f}",
                      f"{r['sharpness']:.1f}", f"{r['mean_rank']:.2f}" if "mean_rank" in r else "-",
                      "best" if r.get("best") else ""])
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return "\n".join(" | ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _plot(path: Path, rows: List[dict], best: LayerItem, args: argparse.Namespace) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no sweep.png (pip install 'stg_ext[cli]')")
        return None
    cfg, candidates = rows[0], rows[1:]
    xs = list(range(len(candidates)))
    labels = [str(r["layer"]) for r in candidates]
    panels = [("temporal_flicker", "temporal flicker (higher: steadier)"),
              ("dynamic_degree", "dynamic degree"), ("motion", "motion (top-5% flow, px @ 256)"),
              ("saturation", "saturation"), ("sharpness", "sharpness (Laplacian variance)"),
              ("mean_rank", "mean rank (lower is better)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    best_x = labels.index(str(best))
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(xs, [r[key] for r in candidates], marker="o", label="STG")
        if key in cfg:
            ax.axhline(cfg[key], color="gray", linestyle="--", label="CFG")
        ax.axvline(best_x, color="tab:red", linestyle=":", label=f"best: {best}")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(xs, labels, fontsize=8, rotation=90 if len(xs) > 16 else 0)
        ax.set_xlabel("layer", fontsize=8)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"stg-ext sweep {args.model}: mode {args.mode}, scale {args.scale}, {args.steps} steps", fontsize=11)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise CLIError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path
