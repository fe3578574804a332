"""`stg-ext eval`: guidance methods on the world model, scored against the world's ground truth."""
from __future__ import annotations

import argparse
import csv
import inspect
import json
import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

import stg_ext
from ...world import classifier as world_classifier
from ...world import render as render_clip, single_object_prompts, spec_for_prompt
from ...world.classifier import HEADS, REFERENCE_SEED_BASE
from ...world.metrics import bootstrap_ci, clip_metrics, frechet_distance
from .. import options
from ..distributed_jobs import JobGroup
from ..errors import CLIError, UsageError, one_line
from ..loading import Model, load_model
from ..progress import progress_bar
from ..render import render
from ..video import ensure_writable_dir
from . import sweep

logger = logging.getLogger("stg_ext.cli")

RESTART = dict(t_min=0.2, t_max=0.5, K=1, unit="sigma")  # the restart interval in flow-matching sigma, fixed a priori


@dataclass(frozen=True)
class Method:
    """One row of the table: CFG on or off, STG (mode, rescale) or none, restart, and further apply_stg keywords
    (`extra`). A method whose `extra` keywords stg_ext.apply_stg does not take is listed as not run."""

    name: str
    cfg: bool = True
    mode: Optional[str] = None  # "attention" (STG-A) | "residual" (STG-R) | None: no STG
    rescale: float = 0.0
    restart: bool = False
    extra: Tuple[Tuple[str, Any], ...] = ()

    def missing(self) -> Optional[str]:
        """Why this method cannot run with this stg_ext, or None."""
        params = inspect.signature(stg_ext.apply_stg).parameters
        absent = [k for k, _ in self.extra if k not in params]
        return f"stg_ext.apply_stg has no {', '.join(absent)} argument" if absent else None


METHODS: Tuple[Method, ...] = (
    Method("CFG"),
    Method("CFG+STG-A", mode="attention"),
    Method("CFG+STG-A r0.7", mode="attention", rescale=0.7),
    Method("CFG+STG-R", mode="residual"),
    Method("CFG+STG-R r0.7", mode="residual", rescale=0.7),
    Method("STG-R (CFG off)", cfg=False, mode="residual"),
    Method("STG-R (CFG off) r0.7", cfg=False, mode="residual", rescale=0.7),
    Method("CFG+STG-R+restart", mode="residual", restart=True),
    # The cheap variants (issue 13): they run once apply_stg takes these keywords.
    Method("CFG+STG-A uncond", mode="attention", extra=(("placement", "uncond"),)),
    Method("CFG+STG-R uncond", mode="residual", extra=(("placement", "uncond"),)),
    Method("CFG+STG-R every=2", mode="residual", extra=(("every", 2),)),
    Method("CFG+STG-R every=4", mode="residual", extra=(("every", 4),)),
)

METRICS = ("shape_acc", "color_acc", "motion_acc", "all_acc", "object_iou", "trajectory_error", "jerk",
           "temporal_flicker", "sharpness", "detected")
HIGHER_IS_BETTER = {"shape_acc": True, "color_acc": True, "motion_acc": True, "all_acc": True, "object_iou": True,
                    "trajectory_error": False, "jerk": False, "temporal_flicker": True, "sharpness": True,
                    "detected": True, "frechet": False}

HELP = "score guidance methods on the world model against the world's ground truth (the paper's Table 1, small)"
DESCRIPTION = f"""\
Samples held-out prompts of stg_ext.world (the "eval" split: (shape, color, motion) combinations the world
model never saw) with every method, and scores each video against what its prompt asks for:

  shape/color/motion_acc  the world classifier (stg_ext/world/classifier.pt, trained on real clips) reads the
                          video's shape, color and motion; all_acc: all three right
  object_iou              IoU of the object with the ideal shape of its prompt (stg_ext.world.metrics)
  trajectory_error        pixels between the object's path and the prompted motion's
  jerk                    unsteadiness of the path (pixels/frame^2 beyond the prompted path's own)
  temporal_flicker        VBench's temporal flickering; sharpness: Laplacian variance
  frechet                 Fréchet distance of the classifier's features, generated vs real held-out clips
  passes/step, s/video    transformer block runs per step / blocks; denoiser seconds per video

Means with 95% bootstrap intervals over videos (none for the Fréchet distance). The STG layers come from
`stg-ext sweep` (its rule) on prompts of the separate "sweep" split, one sweep per mode, unless --layer-a /
--layer-r are given. STG scale --scale for every STG method; restart: apply_restart(t_min={RESTART['t_min']},
t_max={RESTART['t_max']}, K={RESTART['K']}, unit="sigma"). Rows "real" and "real via the VAE" score real clips
of the same prompts, as drawn and after the model's
VAE (the ceiling of any sample of this model).

Writes to --out: eval.csv (one row per method), videos.csv (one row per video), eval.md (the table), eval.json,
sweep_attention/ and sweep_residual/ (the sweeps)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p, positional=False, default="world")
    group = p.add_argument_group("evaluation")
    group.add_argument("--prompts", type=options.positive_int, default=32,
                       help="held-out prompts (drawn from the eval split's one-object prompts) (default: %(default)s)")
    group.add_argument("--seeds", type=options.int_list, default=[0, 1], help="seeds per prompt (default: 0,1)")
    group.add_argument("--steps", type=options.positive_int, help="inference steps (default: the model's)")
    group.add_argument("--methods", default="all",
                       help="comma-separated method names, or 'all' (default); names: "
                            + "; ".join(m.name for m in METHODS))
    group.add_argument("--scale", type=float, default=1.0, help="STG scale of every STG method (default: %(default)s)")
    group.add_argument("--layer-a", type=int, help="STG-A layer (default: `stg-ext sweep`'s pick)")
    group.add_argument("--layer-r", type=int, help="STG-R layer (default: `stg-ext sweep`'s pick)")
    group.add_argument("--sweep-prompts", type=options.positive_int, default=4,
                       help="prompts of the sweep split for each sweep (default: %(default)s)")
    group.add_argument("--bootstrap", type=options.positive_int, default=1000,
                       help="bootstrap resamples (default: %(default)s)")
    group.add_argument("--classifier", help="classifier weights (default: the shipped stg_ext/world/classifier.pt)")
    group.add_argument("--out", default="stg_ext_eval", help="folder to write into (default: %(default)s)")
    options.add_common(p)
    p.set_defaults(run=run)


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

def eval_prompts(n: int, split: str = "eval", seed: int = 0):
    """n one-object prompts of a split, in a fixed order drawn from `seed`."""

    pool = single_object_prompts(split)
    if n > len(pool):
        raise UsageError(f"--prompts {n}: the {split} split has {len(pool)} one-object prompts")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]


# --------------------------------------------------------------------------------------------------
# Layers from the sweep
# --------------------------------------------------------------------------------------------------

def sweep_layer(args: argparse.Namespace, mode: str, out: Path, steps: int, group: JobGroup) -> int:
    """Runs `stg-ext sweep` over every layer on the sweep split's prompts and returns its best layer (under
    torchrun every rank takes part in the sweep, rank 0 reads its pick and tells the others)."""
    folder = out / f"sweep_{mode}"
    argv = ["sweep", args.model, "--layers", "all", "--mode", mode, "--scale", str(args.scale),
            "--seeds", "0", "--steps", str(steps), "--out", str(folder)]
    for p in eval_prompts(args.sweep_prompts, "sweep"):
        argv += ["--prompt", p.prompt]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.quiet:
        argv.append("--quiet")
    parser = argparse.ArgumentParser(prog="stg-ext")
    sweep.add_parser(parser.add_subparsers(dest="command"))
    sweep_args = parser.parse_args(argv)
    if int(sweep_args.run(sweep_args) or 0) != 0:
        raise CLIError(f"the layer sweep ({mode}) failed")
    best = None
    if group.is_main:
        with open(folder / "sweep.csv") as fh:
            rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
        best = [r["layer"] for r in rows if r.get("best") == "1"]
        if len(best) != 1:
            raise CLIError(f"cannot read the best layer from {folder / 'sweep.csv'}")
    return int(group.broadcast(best[0] if best else None))


# --------------------------------------------------------------------------------------------------
# Sampling one method
# --------------------------------------------------------------------------------------------------

@contextmanager
def applied(model: Model, method: Method, layers: Dict[str, int], scale: float) -> Iterator[None]:
    with ExitStack() as stack:
        if method.mode is not None:
            handle = stg_ext.apply_stg(model.pipe, layers[method.mode], method.mode, scale=scale,
                                       rescale=method.rescale, **dict(method.extra))
            stack.callback(handle.remove)
        if method.restart:
            handle = stg_ext.apply_restart(model.pipe, **RESTART)
            stack.callback(handle.remove)
        yield


@contextmanager
def block_counter(model: Model) -> Iterator[List[int]]:
    """Counts the transformer blocks computed (WanTransformer3DModel.blocks, one per layer) by their feed-forward
    calls: a block that prefix reuse lets return at once, or that STG-R skips, runs no feed-forward."""
    count = [0]
    handles = []
    for denoiser in model.denoisers().values():
        blocks = getattr(denoiser, "blocks", None)
        if blocks is None:
            raise CLIError(f"{type(denoiser).__name__} has no .blocks to count (eval runs on the world model)")
        for block in blocks:
            handles.append(block.ffn.register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1)))
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


def sample_jobs(model: Model, methods: Sequence[Method], jobs: Sequence[Tuple[int, Tuple[int, Any, int]]],
                steps: int, layers, scale: float, bar) -> Tuple[List[Tuple[int, dict]], Dict[int, str]]:
    """Renders the given (job index, (method index, prompt, seed)) jobs, each method's under one installation of
    it. Returns per job its frames, seconds and computed blocks, and the methods that failed (index -> reason)."""
    done: List[Tuple[int, dict]] = []
    failed: Dict[int, str] = {}
    by_method: Dict[int, List[Tuple[int, Any, int]]] = {}
    for index, (m_index, prompt, seed) in jobs:
        by_method.setdefault(m_index, []).append((index, prompt, seed))
    for m_index, group in by_method.items():
        method = methods[m_index]
        cfg_scale = model.card.get("call", {}).get("guidance_scale", 5.0) if method.cfg else 1.0
        bar.set_postfix_str(method.name)
        try:
            with applied(model, method, layers, scale), block_counter(model) as count:
                for index, prompt, seed in group:
                    before = count[0]
                    kw = model.call_kwargs(prompt=prompt.prompt, seed=seed, steps=steps, guidance_scale=cfg_scale,
                                           negative_prompt="")
                    r = render(model, kw, progress=False)
                    done.append((index, dict(frames=r.frames, seconds=r.seconds, denoiser_seconds=r.denoiser_seconds,
                                             blocks=count[0] - before)))
                    bar.update()
        except (TypeError, ValueError, NotImplementedError, CLIError) as e:
            # One method that stg_ext refuses (or cannot yet run) does not sink the others: it is listed.
            failed[m_index] = f"failed: {one_line(e)[:200]}"
            logger.warning("%s failed: %s", method.name, one_line(e))
    return done, failed


def method_cost(jobs: Sequence[dict], steps: int, num_layers: int) -> Dict[str, float]:
    """Cost columns of one method from its videos' records."""
    n = len(jobs)
    return dict(videos=n, seconds_per_video=sum(j["seconds"] for j in jobs) / n,
                denoiser_seconds_per_video=sum(j["denoiser_seconds"] for j in jobs) / n,
                passes_per_step=sum(j["blocks"] for j in jobs) / (n * steps * num_layers))


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def classify(classifier, frames: Sequence[np.ndarray]) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    x = torch.stack([torch.from_numpy(f).float().div(255).permute(3, 0, 1, 2) for f in frames])
    preds: Dict[str, List[np.ndarray]] = {k: [] for k in HEADS}
    feats = []
    for i in range(0, len(x), 64):
        chunk = x[i:i + 64]
        f = classifier.features(chunk)
        feats.append(f.numpy())
        for k, head in classifier.heads.items():
            preds[k].append(head(f).argmax(1).numpy())
    return {k: np.concatenate(v) for k, v in preds.items()}, np.concatenate(feats)


def score(frames: Sequence[np.ndarray], prompt_list, classifier) -> Tuple[List[dict], np.ndarray]:
    """Per-video metric rows and the classifier features of every video."""

    preds, feats = classify(classifier, frames)
    rows = []
    for i, (f, prompt) in enumerate(zip(frames, prompt_list)):
        shape, color, _, motion = prompt.objects[0]
        ok = {k: float(HEADS[k][int(preds[k][i])] == v) for k, v in (("shape", shape), ("color", color),
                                                                       ("motion", motion))}
        rows.append(dict(shape_acc=ok["shape"], color_acc=ok["color"], motion_acc=ok["motion"],
                         all_acc=float(all(ok.values())), **clip_metrics(f, prompt)))
    return rows, feats


def summarize_rows(rows: List[dict], feats: np.ndarray, reference: np.ndarray, n_boot: int) -> dict:
    out = {}
    for m in METRICS:
        v = np.array([r[m] for r in rows], dtype=np.float64)
        out[m] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        out[m + "_lo"], out[m + "_hi"] = bootstrap_ci(v, n_boot)
    out["frechet"] = frechet_distance(feats, reference)
    # No interval: resampling rows with replacement duplicates them, which shrinks the fitted covariance and
    # moves the distance itself (the percentile interval did not even contain the estimate for real clips).
    out["frechet_lo"] = out["frechet_hi"] = float("nan")
    return out


def real_frames(prompts, seeds, seed_base: int) -> List[np.ndarray]:
    out = []
    for p_index, prompt in enumerate(prompts):
        for seed in seeds:
            clip = render_clip(spec_for_prompt(prompt, seed_base + 1000 * p_index + seed))
            out.append((clip.video * 255).round().astype(np.uint8))
    return out


@torch.no_grad()
def vae_round_trip(model: Model, frames: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Real clips encoded and decoded by the model's VAE: the best any sample of this model can look."""
    vae = model.pipe.vae
    out = []
    for f in frames:
        x = torch.from_numpy(f).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None].to(vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample[0].clamp(-1, 1)
        out.append(((y.permute(1, 2, 3, 0).float().numpy() + 1) * 127.5).round().astype(np.uint8))
    return out


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

def pick_methods(text: str) -> List[Method]:
    if text == "all":
        return list(METHODS)
    by_name = {m.name.lower(): m for m in METHODS}
    picked = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        if name.lower() not in by_name:
            raise UsageError(f"--methods: unknown method {name!r}; methods: {'; '.join(m.name for m in METHODS)}")
        picked.append(by_name[name.lower()])
    return picked


def run(args: argparse.Namespace) -> int:
    with JobGroup() as group:
        return evaluate(args, group)


def evaluate(args: argparse.Namespace, group: JobGroup) -> int:
    methods = pick_methods(args.methods)
    out = ensure_writable_dir(args.out)
    model = load_model(args.model, options.load_options(args))
    if "call" not in model.card:
        raise UsageError(f"{args.model}: eval needs a world model (a pipeline folder with stg_ext.json), e.g. the "
                         "default 'world'")
    steps = args.steps or model.card["call"].get("num_inference_steps", 20)
    path = Path(args.classifier) if args.classifier else world_classifier.CLASSIFIER_PATH
    if not path.exists():
        raise CLIError(f"no classifier weights at {str(path)!r} (train them: python -m stg_ext.world.classifier)")
    classifier = world_classifier.load(path)

    layers: Dict[str, int] = {}
    for mode, given in (("attention", args.layer_a), ("residual", args.layer_r)):
        if any(m.mode == mode and m.missing() is None for m in methods):
            layers[mode] = given if given is not None else sweep_layer(args, mode, out, steps, group)
    prompts = eval_prompts(args.prompts)
    prompt_list = [p for p in prompts for _ in args.seeds]
    runnable = [m for m in methods if m.missing() is None]
    for m in methods:
        if m.missing() is not None:
            logger.info("not run: %s (%s)", m.name, m.missing())
    seeds_list = [s for _ in prompts for s in args.seeds]
    jobs = [(m_index, p, s) for m_index in range(len(runnable)) for p, s in zip(prompt_list, seeds_list)]
    # Under torchrun the (method, prompt, seed) renders are split over the processes (distributed_jobs.py); rank 0
    # gathers the frames and scores them exactly as one process would.
    mine = group.mine(jobs)
    with progress_bar(total=len(mine), desc="eval", disable=args.quiet, unit="video") as bar:
        done, failed_here = sample_jobs(model, runnable, mine, steps, layers, args.scale, bar)
    by_index = dict(group.gather((i, (i, record)) for i, record in done))
    failed_methods = dict(group.gather((m_index, (m_index, why)) for m_index, why in failed_here.items()))
    if not group.is_main:
        return 0

    reference = classify(classifier, real_frames(prompts, args.seeds, REFERENCE_SEED_BASE))[1]
    table, video_rows = [], []
    real = real_frames(prompts, args.seeds, REFERENCE_SEED_BASE + 100_000)  # another draw of the same prompts
    rows, feats = score(real, prompt_list, classifier)
    table.append(dict(method="real", layer="", **summarize_rows(rows, feats, reference, args.bootstrap)))
    rows, feats = score(vae_round_trip(model, real), prompt_list, classifier)
    table.append(dict(method="real via the VAE", layer="", **summarize_rows(rows, feats, reference, args.bootstrap)))
    failed: List[dict] = []
    for m_index, m in enumerate(runnable):
        if m_index in failed_methods:
            failed.append(dict(method=m.name, reason=failed_methods[m_index]))
            continue
        own = [by_index[i] for i, (j_method, _, _) in enumerate(jobs) if j_method == m_index]
        frames = [r["frames"] for r in own]
        rows, feats = score(frames, prompt_list, classifier)
        for r, p, s in zip(rows, prompt_list, seeds_list):
            video_rows.append(dict(method=m.name, prompt=p.prompt, seed=s, **r))
        table.append(dict(method=m.name, layer=layers.get(m.mode, "") if m.mode else "",
                          **method_cost(own, steps, model.num_layers()),
                          **summarize_rows(rows, feats, reference, args.bootstrap)))
    cfg_row = next((r for r in table if r["method"] == "CFG"), None)
    for r in table:
        if cfg_row is not None and "denoiser_seconds_per_video" in r:
            r["time_vs_cfg"] = r["denoiser_seconds_per_video"] / cfg_row["denoiser_seconds_per_video"]
    not_run = [dict(method=m.name, reason=m.missing()) for m in methods if m.missing() is not None] + failed
    written = write_outputs(out, table, video_rows, not_run, dict(
        model=args.model, steps=steps, scale=args.scale, layers=layers, prompts=len(prompts), seeds=args.seeds,
        videos_per_method=len(prompt_list), restart=RESTART, classifier=str(path)))
    print(markdown_table(table, not_run))
    for p in written:
        print(f"wrote {p}")
    return 0


def _fmt(v, digits=3) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}f}"
    return str(v)


COLUMNS = [("all_acc", "adherence (all 3)"), ("shape_acc", "shape"), ("color_acc", "color"),
           ("motion_acc", "motion"), ("object_iou", "object IoU"), ("trajectory_error", "traj. err px"),
           ("jerk", "jerk"), ("temporal_flicker", "flicker"), ("sharpness", "sharpness"), ("frechet", "Fréchet")]


def markdown_table(table: List[dict], not_run: List[dict]) -> str:
    head = ["method", "layer"] + [c[1] for c in COLUMNS] + ["passes/step", "s/video", "time vs CFG"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["method"], str(r.get("layer", ""))]
        for key, _ in COLUMNS:
            digits = 1 if key == "sharpness" else 3
            cells.append(f"{_fmt(r[key], digits)} [{_fmt(r[key + '_lo'], digits)}, {_fmt(r[key + '_hi'], digits)}]")
        cells += [_fmt(r.get("passes_per_step", ""), 2), _fmt(r.get("denoiser_seconds_per_video", ""), 2),
                  _fmt(r.get("time_vs_cfg", ""), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    for r in not_run:
        lines.append(f"| {r['method']} | not run: {r['reason']} |" + " |" * (len(head) - 2))
    return "\n".join(lines)


def write_outputs(out: Path, table, video_rows, not_run, meta) -> List[Path]:
    try:
        paths = [out / "eval.csv", out / "videos.csv", out / "eval.md", out / "eval.json"]
        keys = sorted({k for r in table for k in r}, key=lambda k: (k != "method", k))
        with open(paths[0], "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for r in table:
                w.writerow({k: _fmt(r.get(k, ""), 6) for k in keys})
        with open(paths[1], "w", newline="") as fh:
            keys = list(video_rows[0]) if video_rows else ["method"]
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for r in video_rows:
                w.writerow({k: _fmt(v, 6) for k, v in r.items()})
        paths[2].write_text(markdown_table(table, not_run) + "\n")
        paths[3].write_text(json.dumps(dict(meta, table=table, not_run=not_run), indent=1, default=str))
    except OSError as e:
        raise CLIError(f"cannot write into {str(out)!r}: {e.strerror or e}") from None
    return paths
