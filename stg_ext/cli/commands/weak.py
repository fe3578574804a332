"""`stg-ext weak MODEL --prompt ... --timestep t`: the paper's weak-model visualization (appendix A5.6)."""
from __future__ import annotations

import argparse
from typing import Callable, Dict

from .. import options
from ..errors import UsageError
from ..loading import Model, load_model
from ..probe import ProbeResult, StepProbe
from ..progress import progress_bar
from ..render import STGSettings, check_stg
from ..video import ensure_writable_dir, labeled_grid, pick_frames, save_png, write_video

HELP = "the paper's weak-model visualization (A5.6): one-step x0 predictions at one step, as a grid"
DESCRIPTION = """\
Samples with plain CFG up to step t (--timestep, 0-based, of --steps; negative counts from the end), then
shows what one step from those same latents x_t predicts as the clean video x0, for each of:

  (a) cond       the conditional prediction c alone
  (b) uncond     the unconditional prediction u alone (CFG's weak model)
  (c) perturbed  the perturbed prediction p alone (STG's weak model: --layer/--mode)
  (d) CFG        the pipeline's CFG prediction u + g(c - u)
  (e) STG        the pipeline's STG prediction (stg_ext.apply_stg at step t only: --scale/--rescale)

x0 comes from the scheduler's parametrization at step t (flow matching: x0 = x_t - sigma_t v;
epsilon / v-prediction: the standard formulas), and each x0 is decoded by the pipeline itself. The
pipeline runs five times: the first records every denoiser output, the others replay them up to step t
(no model call; the same x_t bit for bit, checked) and differ only at step t.

Writes to --out: weak_grid.png (one row per prediction, --frames frames each, labeled) and one video per
row (weak_cond.mp4, weak_uncond.mp4, weak_perturbed.mp4, weak_cfg.mp4, weak_stg.mp4)."""

ROWS = (("cond", "(a) cond"), ("uncond", "(b) uncond"), ("perturbed", "(c) perturbed"), ("cfg", "(d) CFG"),
        ("stg", "(e) STG"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weak", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    options.add_sampling(p, steps=30)
    p.add_argument("--timestep", type=int, default=None,
                   help="the step t whose one-step predictions are shown: 0-based index of --steps, negative "
                        "from the end (default: steps // 2)")
    options.add_stg(p)
    group = p.add_argument_group("output")
    group.add_argument("--out", default="stg_ext_weak", help="folder to write into (default: %(default)s)")
    group.add_argument("--frames", type=options.positive_int, default=8,
                       help="frames per row of the grid, spread over the video (default: %(default)s)")
    options.add_common(p)
    p.set_defaults(run=run)


def weak_predictions(model: Model, kwargs: Callable[[], dict], step: int, stg: STGSettings,
                     show_progress: bool = True) -> Dict[str, ProbeResult]:
    """The one-step predictions at `step` by name (cond, uncond, perturbed, cfg, stg; no uncond / cfg when
    the pipeline's CFG is off). `kwargs()` gives a fresh call (same seed) each time."""
    if isinstance(stg.mode, tuple):
        raise UsageError("weak shows one perturbed prediction: give one --mode")
    model.pipe.set_progress_bar_config(disable=True)  # one bar over the five runs instead
    probe = StepProbe(model.pipe, model.denoisers(), model.convention(), step)
    results: Dict[str, ProbeResult] = {}
    with progress_bar(total=5, desc="weak", disable=not show_progress) as bar:
        bar.set_postfix_str("recording")
        results["cfg"] = probe.record(kwargs(), stg.layer, stg.mode)
        bar.update()
        branches = probe.branches()
        for name in ("cond", "uncond", "perturbed"):
            bar.set_postfix_str(name)
            if branches[name] is not None:
                results[name] = probe.substitute(kwargs(), branches[name])
            bar.update()
        bar.set_postfix_str("stg")
        results["stg"] = probe.guided(kwargs(), stg)
        bar.update()
    if branches["uncond"] is None:
        del results["cfg"]  # CFG off: the pipeline's prediction is c itself
    return results


def run(args: argparse.Namespace) -> int:
    out = ensure_writable_dir(args.out)
    model = load_model(args.model, options.load_options(args))
    if args.prompt is None and model.takes_prompt:
        raise UsageError(f"--prompt is required: {type(model.pipe).__name__} is conditioned on text")
    step = args.timestep if args.timestep is not None else args.steps // 2
    if not -args.steps <= step < args.steps:
        raise UsageError(f"--timestep {step} is outside the {args.steps} steps (0..{args.steps - 1}, or negative "
                         "from the end)")
    step %= args.steps
    layer = args.layer if args.layer is not None else options.default_layer(model.num_layers())
    stg = options.stg_settings(args, layer)
    check_stg(model.pipe, stg)
    extra = options.sampling_kwargs(args)

    def kwargs() -> dict:
        return model.call_kwargs(prompt=args.prompt, seed=args.seed, steps=args.steps, **extra)

    results = weak_predictions(model, kwargs, step, stg, show_progress=not args.quiet)
    timestep = results["cond"].capture.timestep
    timestep = timestep.flatten()[0].item() if hasattr(timestep, "flatten") else timestep
    rows = [(label, pick_frames(results[name].frames, args.frames)) for name, label in ROWS if name in results]
    title = f"{args.model}: step {step} of {args.steps} (timestep {float(timestep):g}), {stg.describe()}"
    written = [save_png(out / "weak_grid.png", labeled_grid(rows, title=title))]
    for name, _ in ROWS:
        if name in results:
            written.append(write_video(out / f"weak_{name}.mp4", results[name].frames, args.fps))
    if "uncond" not in results:
        print("note: the pipeline's CFG is off: no uncond and CFG rows")
    for path in written:
        print(f"wrote {path}")
    return 0
