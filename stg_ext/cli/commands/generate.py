"""`stg-ext generate MODEL --prompt ... --out video.mp4`: one video with STG; `--compare` adds plain CFG."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import options
from ..errors import UsageError
from ..loading import load_model
from ..render import check_stg, render
from ..video import check_video_path, side_by_side, write_video

HELP = "a video from a hub model or a local pipeline folder, with STG"
DESCRIPTION = """\
Loads a stock diffusers pipeline (DiffusionPipeline.from_pretrained on a hub id or a local folder, or
tiny:<family>), applies STG with stg_ext.apply_stg, samples one video and writes it to --out.

With --compare it first samples plain CFG with the same seed (STG removed), and also writes
<out>_cfg<ext> (the CFG video) and <out>_compare<ext> (CFG | STG side by side, labeled).

Example:
  stg-ext generate genmo/mochi-1-preview --prompt "A cat drinking beer" --layer 34 --mode residual \\
      --steps 64 --dtype bfloat16 --offload model --out cat.mp4 --compare"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    options.add_sampling(p, steps=30)
    options.add_stg(p)
    group = p.add_argument_group("output")
    group.add_argument("--out", default="video.mp4",
                       help="the video file to write (.mp4, .mov, .mkv, .webm, .avi through ffmpeg, or .gif) "
                            "(default: %(default)s)")
    group.add_argument("--compare", action="store_true",
                       help="also sample plain CFG with the same seed; write <out>_cfg and <out>_compare "
                            "(side by side)")
    options.add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = check_video_path(args.out)  # before loading: a bad --out must not cost a model load
    model = load_model(args.model, options.load_options(args))
    if args.prompt is None and model.takes_prompt:
        raise UsageError(f"--prompt is required: {type(model.pipe).__name__} is conditioned on text")
    layer = args.layer if args.layer is not None else options.default_layer(model.num_layers())
    stg = options.stg_settings(args, layer)
    check_stg(model.pipe, stg)  # a bad layer or mode fails now, not after the CFG run
    extra = options.sampling_kwargs(args)

    def kwargs():  # a fresh seeded generator per run: CFG and STG start from the same noise
        return model.call_kwargs(prompt=args.prompt, seed=args.seed, steps=args.steps, **extra)

    cfg = render(model, kwargs(), desc="CFG") if args.compare else None
    result = render(model, kwargs(), stg, desc="STG")
    written = [write_video(out, result.frames, args.fps)]
    print(f"STG ({stg.describe()}): {result.seconds:.1f} s, {len(result.frames)} frames of "
          f"{result.frames.shape[2]}x{result.frames.shape[1]}")
    if cfg is not None:
        print(f"CFG: {cfg.seconds:.1f} s")
        written.append(write_video(_beside(out, "_cfg"), cfg.frames, args.fps))
        both = side_by_side([("CFG", cfg.frames), (stg.short(), result.frames)])
        written.append(write_video(_beside(out, "_compare"), both, args.fps))
    for path in written:
        print(f"wrote {path}")
    return 0


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}{suffix}{path.suffix}")
