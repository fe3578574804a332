"""`stg-ext demo`: CFG and STG with the same seed on the shipped world model (no download, no network)."""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import List

import torch

from .. import options
from ..loading import load_model
from ..prompts import load_prompts
from ..render import check_stg, render
from ..video import (ensure_writable_dir, labeled_grid, pick_frames, save_png, side_by_side, to_uint8_frames,
                     write_video)
from ..errors import CLIError

DEFAULT_MODEL = "world"
DEFAULT_STEPS = 10  # for models whose folder does not say (stg_ext.json's call.num_inference_steps)
MIN_FRAME_SIDE = 96  # smaller frames are enlarged (nearest neighbour, integer factor) in the written files
HELP = "offline demo: the shipped world model, CFG and STG with the same seed, videos + strip + timing"
DESCRIPTION = f"""\
Runs on a fresh machine with no download and no network (HF_HUB_OFFLINE=1 is fine): loads the world model
shipped in the package ({DEFAULT_MODEL}: a stock WanPipeline folder, stg_ext/world/model, with an 8-block
WanTransformer3DModel, a tiny UMT5 text encoder and an AutoencoderKLWan, trained on the shapes of
stg_ext.world by scripts/train_world_model.py) with DiffusionPipeline.from_pretrained, samples the same prompt
and seed with plain CFG and with STG, and writes to --out:

  cfg.mp4, stg.mp4   the two videos (GIF instead when mp4 writing is unavailable)
  compare.mp4        CFG | STG side by side
  strip.png          the frames of both, one row each
  timing.csv         wall time of each stage (the table is also printed)

The world model makes 13 frames of 32 x 32 (enlarged for the files). Its prompt, steps, CFG scale and STG
layer come from the folder's stg_ext.json unless given. --model runs the same demo on any MODEL (a hub id, a
pipeline folder, or tiny:<family>: random weights, whose videos show the path running, not what STG does)."""

# seconds: the whole pipeline call (text encoding, sampling, VAE decoding); denoiser_seconds: the part spent
# inside the denoiser, where STG's perturbed passes run; ms_per_step and vs_cfg are of the denoiser time.
TIMING_FIELDS = ["stage", "seconds", "denoiser_seconds", "steps", "ms_per_step", "vs_cfg", "threads"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p, positional=False, default=DEFAULT_MODEL)
    options.add_sampling(p, steps=DEFAULT_STEPS)
    for action in p._actions:
        if action.dest == "steps":  # the model's own step count unless given
            action.default = None
            action.help = (f"number of inference steps (default: the model folder's stg_ext.json, 20 for the world "
                           f"model; else {DEFAULT_STEPS})")
    options.add_stg(p)
    group = p.add_argument_group("output")
    group.add_argument("--out", default="stg_ext_demo", help="folder to write into (default: %(default)s)")
    group.add_argument("--strip-frames", type=options.positive_int, default=9,
                       help="frames per row of strip.png, spread over the video (default: %(default)s)")
    options.add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = ensure_writable_dir(args.out)
    timings: List[dict] = []

    start = time.perf_counter()
    model = load_model(args.model, options.load_options(args))
    timings.append(dict(stage=f"load {args.model}", seconds=time.perf_counter() - start))
    demo = model.card.get("demo", {})
    steps = args.steps or model.card.get("call", {}).get("num_inference_steps") or DEFAULT_STEPS
    args.steps = steps
    prompt = args.prompt if args.prompt is not None else demo.get("prompt") or load_prompts("curated")[0]
    layer = args.layer if args.layer is not None else demo.get("layer", options.default_layer(model.num_layers()))
    stg = options.stg_settings(args, layer)
    check_stg(model.pipe, stg)
    extra = options.sampling_kwargs(args)

    def kwargs(steps: int) -> dict:
        return model.call_kwargs(prompt=prompt, seed=args.seed, steps=steps, **extra)

    # One untimed-in-the-comparison step first: the first call of a pipeline pays one-off costs (lazy
    # initialisation, allocator warm-up) that would otherwise be charged to whichever run comes first.
    warm = render(model, kwargs(1), desc="warm-up", leave=False)
    timings.append(dict(stage="warm-up (1 step)", seconds=warm.seconds, denoiser_seconds=warm.denoiser_seconds,
                        steps=1))
    cfg = render(model, kwargs(args.steps), desc="CFG")
    result = render(model, kwargs(args.steps), stg, desc="STG")
    for name, r in (("CFG", cfg), (f"STG ({stg.describe()})", result)):
        timings.append(dict(stage=name, seconds=r.seconds, denoiser_seconds=r.denoiser_seconds, steps=args.steps,
                            ms_per_step=1000 * r.denoiser_seconds / args.steps,
                            vs_cfg=r.denoiser_seconds / cfg.denoiser_seconds))
    threads = torch.get_num_threads()
    for row in timings:
        row["threads"] = threads

    cfg_frames, stg_frames = enlarge(cfg.frames), enlarge(result.frames)
    written = [write_video(out / "cfg.mp4", cfg_frames, args.fps), write_video(out / "stg.mp4", stg_frames, args.fps),
               write_video(out / "compare.mp4", side_by_side([("CFG", cfg_frames), (stg.short(), stg_frames)]),
                           args.fps)]
    title = f"{args.model}, seed {args.seed}, {args.steps} steps: {_clip(prompt, 90)}"
    strip = labeled_grid([("CFG", pick_frames(cfg_frames, args.strip_frames)),
                          (stg.short(), pick_frames(stg_frames, args.strip_frames))], title=title)
    written.append(save_png(out / "strip.png", strip))
    written.append(_write_timing(out / "timing.csv", timings))

    print(f"prompt: {prompt}")
    print(_table(timings))
    headline = demo.get("eval")
    if headline and args.layer is None and (args.mode, args.scale, args.rescale) == ("attention", 1.0, 0.0):
        # Figures of `stg-ext eval` on held-out prompts for the settings this demo uses (stg_ext.json).
        print(f"eval ({headline.get('videos', '?')} held-out videos per method; {headline.get('command', '')}):")
        for line in headline.get("lines", []):
            print(f"  {line}")
    if model.tiny is not None:
        print(f"note: {args.model} has random weights; its videos show the pipeline running, not what STG does to "
              "a trained model")
    for path in written:
        print(f"wrote {path}")
    return 0


def enlarge(frames):
    """Frames at most half MIN_FRAME_SIDE, enlarged by the integer factor that brings them closest below it
    (nearest neighbour, as uint8): 32 pixels -> 96; 64 stay 64."""
    frames = to_uint8_frames(frames)
    k = max(1, MIN_FRAME_SIDE // min(frames.shape[1:3]))
    return frames if k == 1 else frames.repeat(k, axis=1).repeat(k, axis=2)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _fmt(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _write_timing(path: Path, rows: List[dict]) -> Path:

    try:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=TIMING_FIELDS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(row.get(k), 3) for k in TIMING_FIELDS})
    except OSError as e:
        raise CLIError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return path


def _table(rows: List[dict]) -> str:
    cells = [["stage", "total s", "denoiser s", "steps", "denoiser ms/step", "vs CFG"]]
    for r in rows:
        cells.append([r["stage"], _fmt(r["seconds"], 2), _fmt(r.get("denoiser_seconds"), 2), _fmt(r.get("steps"), 0),
                      _fmt(r.get("ms_per_step"), 1), _fmt(r.get("vs_cfg"), 2)])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
