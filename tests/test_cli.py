"""The `stg-ext` command line, end to end on tiny offline pipelines: every command, the files it writes (read
back: frame counts and sizes), --help, and the error cases (one line on stderr, non-zero exit, no traceback)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stg_ext.cli import main
from stg_ext import video_metrics as metrics
from stg_ext.cli.commands import bench as bench_cmd
from stg_ext.cli.commands.sweep import average_ranks, parse_layers, summarize
from stg_ext.cli.errors import CLIError, UsageError
from stg_ext.cli.main import build_parser
from stg_ext.cli.prompts import BUILTIN, load_prompts
from stg_ext.cli.video import (GAP, LABEL_HEIGHT, read_video, side_by_side, to_uint8_frames, write_video)

REPO = Path(__file__).resolve().parents[1]


def world_model_path():
    from stg_ext.world import model_path

    return model_path()
# tiny:wan decodes 9 frames of 64x64.
FRAMES, H, W = 9, 64, 64


def run_cli(args, capsys):
    code = main([str(a) for a in args] + ["--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def subprocess_cli(*args, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "stg_ext", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def assert_video(path, frames=FRAMES, size=(H, W)):
    video = read_video(path)
    assert video.dtype == np.uint8 and video.shape == (frames, *size, 3), (path, video.shape)
    return video


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(line for line in fh if not line.startswith("#")))


def assert_one_line_error(code, err, expected_code, *fragments):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stg-ext: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------------

COMMANDS = ("demo", "generate", "sweep", "weak", "bench", "eval")


def test_help_documents_every_option(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for command in COMMANDS:
        assert command in top
    subparsers = next(a for a in build_parser()._actions if a.choices and "demo" in a.choices).choices
    assert set(subparsers) == set(COMMANDS)
    for command, parser in subparsers.items():
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        for action in parser._actions:
            assert action.help, f"{command}: {action.dest} has no help"
            for flag in action.option_strings:
                assert flag in text, f"{command} --help does not show {flag}"
        if command != "bench":
            assert "--out" in text and "MODEL" in text.replace("--model", "")


# --------------------------------------------------------------------------------------------------
# demo: offline, through `python -m stg_ext`
# --------------------------------------------------------------------------------------------------

def test_demo_runs_offline(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess_cli("demo", "--model", "tiny:wan", "--out", out, "--steps", "4", "--quiet")
    assert proc.returncode == 0, proc.stderr
    cfg, stg = assert_video(out / "cfg.mp4"), assert_video(out / "stg.mp4")
    assert not np.array_equal(cfg, stg)  # STG changed the sample
    assert_video(out / "compare.mp4", size=(LABEL_HEIGHT + H, 2 * W + GAP))
    from PIL import Image

    with Image.open(out / "strip.png") as strip:
        # title band + two rows of 64-pixel frames; 9 frames per row after the label column
        assert strip.size[1] == LABEL_HEIGHT + GAP + 2 * H + GAP
        assert strip.size[0] > FRAMES * W
    rows = read_csv(out / "timing.csv")
    assert [r["stage"].split(" ")[0] for r in rows] == ["load", "warm-up", "CFG", "STG"]
    assert float(rows[2]["vs_cfg"]) == 1.0 and float(rows[3]["denoiser_seconds"]) > 0
    assert "denoiser ms/step" in proc.stdout and "wrote" in proc.stdout


WORLD_FRAMES, WORLD_SIDE = 13, 96  # the world model's 13 frames of 32 x 32, enlarged 3x in the demo's files


def test_demo_default_is_the_shipped_world_model(tmp_path):
    """The README's main job: `stg-ext demo` with no options, offline, on the trained model shipped in the package,
    loaded through DiffusionPipeline.from_pretrained, in under a minute."""
    out = tmp_path / "demo"
    start = time.perf_counter()
    proc = subprocess_cli("demo", "--out", out, "--quiet")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert seconds < 60, seconds
    cfg = assert_video(out / "cfg.mp4", frames=WORLD_FRAMES, size=(WORLD_SIDE, WORLD_SIDE))
    stg = assert_video(out / "stg.mp4", frames=WORLD_FRAMES, size=(WORLD_SIDE, WORLD_SIDE))
    assert not np.array_equal(cfg, stg)
    # A trained model draws an object on its background: frames are not noise (most pixels of a frame share
    # the background's few values) and not blank.
    for video in (cfg, stg):
        assert video.std() > 10
        values, counts = np.unique(video[0].reshape(-1, 3) // 32, axis=0, return_counts=True)
        assert counts.max() > 0.3 * WORLD_SIDE * WORLD_SIDE
    from PIL import Image

    with Image.open(out / "strip.png") as strip:
        assert strip.size[1] == LABEL_HEIGHT + GAP + 2 * WORLD_SIDE + GAP
    card = json.loads((world_model_path() / "stg_ext.json").read_text())
    prompt = card["demo"]["prompt"]
    assert f"prompt: {prompt}" in proc.stdout and "load world" in proc.stdout
    rows = read_csv(out / "timing.csv")
    assert [r["stage"].split(" ")[0] for r in rows] == ["load", "warm-up", "CFG", "STG"]
    assert int(rows[2]["steps"]) == card["call"]["num_inference_steps"]


def test_world_model_loads_the_real_way():
    from stg_ext.cli.loading import LoadOptions, load_model

    folder = world_model_path()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2 ** 20
    for part in ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).exists(), part
    model = load_model("world", LoadOptions(progress=False))
    assert type(model.pipe).__name__ == "WanPipeline"
    assert model.pipe.config._name_or_path == str(folder)  # DiffusionPipeline.from_pretrained of the folder
    assert model.num_layers() >= 8
    kw = model.call_kwargs(prompt="a large red circle moving right on a black background", seed=0, steps=2)
    assert (kw["height"], kw["width"], kw["num_frames"]) == (32, 32, WORLD_FRAMES)
    assert kw["max_sequence_length"] == model.pipe.tokenizer.model_max_length
    # Command-line values override the folder's defaults.
    assert model.call_kwargs(prompt="x", seed=0, steps=2, guidance_scale=2.0)["guidance_scale"] == 2.0


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------

def test_generate_compare(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code, stdout, err = run_cli(["generate", "tiny:wan", "--prompt", "a cat running on the grass", "--steps", 3,
                                 "--layer", 1, "--mode", "residual", "--scale", 2, "--seed", 3, "--out", out,
                                 "--compare"], capsys)
    assert code == 0, err
    stg = assert_video(out)
    cfg = assert_video(tmp_path / "clip_cfg.mp4")
    both = assert_video(tmp_path / "clip_compare.mp4", size=(LABEL_HEIGHT + H, 2 * W + GAP))
    assert not np.array_equal(cfg, stg)
    # The side-by-side video holds the two (lossy codec: close, not equal).
    assert np.abs(both[:, LABEL_HEIGHT:, :W].astype(int) - cfg.astype(int)).mean() < 12
    assert "STG-R layer 1 scale 2" in stdout


def test_generate_loads_a_pipeline_folder_through_from_pretrained(tmp_path, capsys):
    from stg_ext.testing.tiny import tiny_pipeline

    folder = tmp_path / "tiny-wan"
    tiny_pipeline("wan", text_encoder=True).pipe.save_pretrained(folder)
    out = tmp_path / "from_folder.gif"
    code, _, err = run_cli(["generate", folder, "--prompt", "a red car in the city", "--height", 32, "--width", 48,
                            "--num-frames", 5, "--steps", 2, "--call-arg", "max_sequence_length=16",
                            "--layer", "-1", "--out", out], capsys)
    assert code == 0, err
    assert_video(out, frames=5, size=(32, 48))


def test_mp4_unavailable_falls_back_to_gif(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STG_EXT_NO_FFMPEG", "1")
    code, stdout, err = run_cli(["generate", "tiny:ltx", "--prompt", "a dog", "--steps", 2,
                                 "--out", tmp_path / "v.mp4"], capsys)
    assert code == 0, err
    assert not (tmp_path / "v.mp4").exists()
    assert_video(tmp_path / "v.gif", frames=9, size=(32, 32))
    assert "writing v.gif instead" in err


# --------------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------------

def test_sweep_scores_every_layer_and_names_the_best(tmp_path, capsys):
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(["sweep", "tiny:wan", "--layers", "0:3", "--mode", "residual", "--steps", 2,
                                 "--prompts", "evalcrafter", "--num-prompts", 1, "--seeds", "0,1", "--out", out,
                                 "--save-videos"], capsys)
    assert code == 0, err
    summary = read_csv(out / "sweep.csv")
    assert [r["layer"] for r in summary] == ["cfg", "0", "1", "2"]
    assert sum(r["best"] == "1" for r in summary) == 1
    best = next(r["layer"] for r in summary if r["best"] == "1")
    assert f"best layer: {best}" in stdout
    for r in summary:
        assert r["videos"] == "2"
        assert 0 <= float(r["temporal_flicker"]) <= 1 and 0 <= float(r["saturation"]) <= 1
    assert (out / "sweep.csv").read_text().startswith("# best layer = the lowest mean rank")
    runs = read_csv(out / "runs.csv")
    assert len(runs) == 2 * 4
    for r in runs:
        assert assert_video(r["video"]).shape[0] == int(r["frames"])
    from PIL import Image

    with Image.open(out / "sweep.png") as plot:
        assert plot.size[0] > 500


def test_sweep_layer_parsing_and_rule():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0:48:2", 48)[:3] == [0, 2, 4]
    assert parse_layers("30,32,-1,30", 48) == [30, 32, 47]
    assert parse_layers("blocks.8,1", 10) == ["blocks.8", 1]
    for bad in ("0:49", "50", "-49", "a:b", ","):
        with pytest.raises(UsageError):
            parse_layers(bad, 48)
    assert average_ranks([3.0, 1.0, 3.0], higher_is_better=True) == [1.5, 3.0, 1.5]
    # Layer 2 wins three criteria of four; layers 0 and 1 tie on everything: the later one ranks first.
    runs = []
    for layer, flick, sharp, sat in (("cfg", 0.9, 10.0, 0.5), (0, 0.9, 10.0, 0.6), (1, 0.9, 10.0, 0.6),
                                     (2, 0.95, 20.0, 0.5)):
        runs.append(dict(layer=layer, prompt_index=0, seed=0, temporal_flicker=flick, dynamic=0.0, motion=1.0,
                         saturation=sat, sharpness=sharp, seconds=1.0))
    rows, best = summarize(runs, [0, 1, 2])
    assert best == 2 and rows[3]["rank_saturation_shift"] == 1.0 and rows[3]["best"] == 1
    rows, best = summarize([r for r in runs if r["layer"] != 2], [0, 1])
    assert best == 1


# --------------------------------------------------------------------------------------------------
# weak
# --------------------------------------------------------------------------------------------------

def test_weak_writes_the_grid_and_one_video_per_prediction(tmp_path, capsys):
    out = tmp_path / "weak"
    code, stdout, err = run_cli(["weak", "tiny:wan", "--prompt", "a cat", "--steps", 4, "--timestep", 2,
                                 "--layer", 1, "--mode", "residual", "--frames", 4, "--out", out], capsys)
    assert code == 0, err
    from PIL import Image

    with Image.open(out / "weak_grid.png") as grid:
        assert grid.size[1] == LABEL_HEIGHT + GAP + 5 * H + 4 * GAP  # title, then rows (a) to (e)
        assert grid.size[0] > 4 * W + 3 * GAP
    videos = {name: assert_video(out / f"weak_{name}.mp4") for name in ("cond", "uncond", "perturbed", "cfg", "stg")}
    assert not np.array_equal(videos["cfg"], videos["stg"])


@pytest.mark.parametrize("family", ["wan", "cogvideox"])  # flow matching; v-prediction DDIM
def test_weak_predictions_follow_the_guidance_lines(family):
    """In the scheduler's space, the five predictions at step t satisfy F_cfg = F_u + g (F_c - F_u) and
    F_stg = F_cfg + s (F_c - F_p): each is the pipeline's own transform of one branch, from the same x_t."""
    from stg_ext.cli.commands.weak import weak_predictions
    from stg_ext.cli.loading import LoadOptions, load_model
    from stg_ext.cli.render import STGSettings
    from stg_ext.testing.tiny import CFG_SCALE

    model = load_model(f"tiny:{family}", LoadOptions(progress=False, threads=torch.get_num_threads()))
    results = weak_predictions(model, lambda: model.call_kwargs(prompt="a dog", seed=1, steps=4), 2,
                               STGSettings(layer=1, mode="residual", scale=1.5), show_progress=False)
    assert set(results) == {"cond", "uncond", "perturbed", "cfg", "stg"}
    f = {k: r.capture.model_output.double() for k, r in results.items()}
    x_t = results["cfg"].capture.sample
    for r in results.values():
        assert torch.equal(r.capture.sample, x_t)
        assert r.frames.shape == (9, H, W, 3)
    tol = 1e-5 * max(v.abs().max().item() for v in f.values())
    assert torch.allclose(f["cfg"], f["uncond"] + CFG_SCALE * (f["cond"] - f["uncond"]), atol=tol, rtol=0)
    assert torch.allclose(f["stg"], f["cfg"] + 1.5 * (f["cond"] - f["perturbed"]), atol=tol, rtol=0)
    assert not torch.allclose(f["cond"], f["perturbed"])
    # x0 follows the same lines (it is affine in the prediction).
    x0 = {k: r.capture.x0.double() for k, r in results.items()}
    assert torch.allclose(x0["stg"], x0["cfg"] + 1.5 * (x0["cond"] - x0["perturbed"]), atol=10 * tol, rtol=0)


def test_x0_formulas_match_the_schedulers_own():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from stg_ext.cli.x0 import predict_x0

    gen = torch.Generator().manual_seed(0)
    x, out = torch.randn(1, 4, 3, 8, 8, generator=gen), torch.randn(1, 4, 3, 8, 8, generator=gen)
    for prediction_type in ("epsilon", "v_prediction"):
        for cls in (DDIMScheduler, EulerDiscreteScheduler):
            s = cls(prediction_type=prediction_type)
            s.set_timesteps(10)
            t = s.timesteps[3]
            for i in range(3):  # move the step index to 3 as a pipeline would
                s.step(out, s.timesteps[i], x)
            mine = predict_x0(s, out, t, x)
            ref = s.step(out, t, x).pred_original_sample
            assert torch.allclose(mine, ref.float(), atol=1e-5), (cls.__name__, prediction_type)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(4)
    for i, t in enumerate(flow.timesteps):
        x0 = predict_x0(flow, out, t, x)
        prev = flow.step(out, t, x).prev_sample
        sigma, sigma_next = flow.sigmas[i], flow.sigmas[i + 1]
        # The Euler step lands on the line from x_t to x0: prev = x0 + (sigma_next / sigma)(x_t - x0).
        assert torch.allclose(prev, x0 + (sigma_next / sigma) * (x - x0), atol=1e-5)
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    unipc.set_timesteps(5)
    t = unipc.timesteps[0]
    assert torch.allclose(predict_x0(unipc, out, t, x), x - unipc.sigmas[0] * out, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------

def test_bench_quick_writes_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    code, stdout, err = run_cli(["bench", "--quick", "--only", "combine,identity_attention", "--out", out], capsys)
    assert code == 0, err
    combine = read_csv(out / "combine.csv")
    assert combine and float(combine[0]["eager_reference_ms"]) > 0
    assert read_csv(out / "identity_attention.csv")[0]["N"] == "512"
    from PIL import Image

    with Image.open(out / "combine.png") as plot:
        assert plot.size[0] > 300
    assert f"wrote {out / 'combine.png'}" in stdout


def test_bench_needs_the_repository_checkout(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "site-packages" / "stg_ext" / "cli" / "commands" / "bench.py"
    monkeypatch.setattr(bench_cmd, "__file__", str(fake))
    monkeypatch.chdir(REPO)  # an installed wheel finds the checkout it runs in
    assert bench_cmd.find_benchmarks(None) == REPO / "benchmarks"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CLIError, match="repository checkout"):
        bench_cmd.find_benchmarks(None)
    code, _, err = run_cli(["bench", "--only", "nope", "--out", tmp_path / "b", "--benchmarks", REPO / "benchmarks"],
                           capsys)
    assert_one_line_error(code, err, 2, "no benchmark named nope")


# --------------------------------------------------------------------------------------------------
# Errors: one line, non-zero, no traceback
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, code, fragment", [
    (["generate", "tiny:wan", "--prompt", "x", "--layer", "7"], 2, "layer 7 is out of range"),
    (["generate", "tiny:wan", "--prompt", "x", "--mode", "bogus"], 2, "invalid mode 'bogus'"),
    (["generate", "tiny:wan", "--prompt", "x", "--mode", "spatial"], 2, "mode 'spatial' is not available"),
    (["generate", "tiny:nope", "--prompt", "x"], 2, "unknown tiny model"),
    (["generate", "./no/such/folder", "--prompt", "x"], 1, "no such folder"),
    (["generate", "tiny:wan", "--prompt", "x", "--out", "video.txt"], 2, "give a video file name"),
    (["generate", "tiny:wan", "--prompt", "x", "--offload", "model", "--device", "cpu"], 2, "needs --device cuda"),
    (["generate", "tiny:ltx2", "--prompt", "x"], 1, "LTX-2 pipelines run their own STG"),
    (["sweep", "tiny:wan", "--layers", "0:48"], 2, "the model has 3 layers"),
    (["weak", "tiny:wan", "--prompt", "x", "--steps", "4", "--timestep", "9"], 2, "outside the 4 steps"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_errors_are_one_line(tmp_path, capsys, args, code, fragment):
    if "--out" not in args and args[0] != "frobnicate":
        args = args + ["--out", str(tmp_path / ("x.mp4" if args[0] == "generate" else "out"))]
    got, _, err = run_cli(args, capsys)
    assert_one_line_error(got, err, code, fragment)


def test_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for args in (["generate", "tiny:wan", "--prompt", "x", "--out", blocker / "v.mp4"],
                 ["demo", "--out", blocker / "demo"],
                 ["sweep", "tiny:wan", "--out", blocker / "sweep"],
                 ["weak", "tiny:wan", "--prompt", "x", "--out", blocker / "weak"],
                 ["bench", "--out", blocker / "bench"]):
        code, _, err = run_cli(args, capsys)
        assert_one_line_error(code, err, 1, "is a file, not a folder")


def test_unknown_model_offline_is_one_line_through_the_console_script():
    """Also runs the installed `stg-ext` script when there is one (scripts/setup.sh installs it)."""
    script = Path(sys.executable).with_name("stg-ext")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "stg_ext"]
    proc = subprocess.run(command + ["generate", "nobody-here/no-such-model-xyz", "--prompt", "x", "--out",
                                     "unused.mp4"], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert_one_line_error(proc.returncode, proc.stderr, 1, "HF_HUB_OFFLINE=1 forbids downloading")
    assert not (REPO / "unused.mp4").exists()


# --------------------------------------------------------------------------------------------------
# Parts: prompts, frames, metrics
# --------------------------------------------------------------------------------------------------

def test_prompt_lists(tmp_path):
    assert {name: len(load_prompts(name)) for name in BUILTIN} == {"curated": 25, "evalcrafter": 42, "figures": 5}
    assert load_prompts("evalcrafter")[0] == "2 Dog and a whale, ocean adventure"
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\nfirst prompt\n  second prompt  \n")
    assert load_prompts(str(f)) == ["first prompt", "second prompt"]
    with pytest.raises(UsageError):
        load_prompts("no-such-list")


def test_frames_from_pipeline_outputs_and_odd_sizes(tmp_path):
    from PIL import Image

    floats = np.random.default_rng(0).random((1, 3, 7, 9, 3), dtype=np.float32)
    frames = to_uint8_frames(floats)
    assert frames.shape == (3, 7, 9, 3) and frames.dtype == np.uint8
    assert to_uint8_frames(torch.from_numpy(floats[0]).permute(0, 3, 1, 2)).shape == (3, 7, 9, 3)
    assert to_uint8_frames([[Image.fromarray(f) for f in frames]]).shape == (3, 7, 9, 3)
    # odd sizes keep every pixel (yuv444p), nothing is rescaled
    assert_video(write_video(tmp_path / "odd.mp4", frames, fps=4), frames=3, size=(7, 9))
    assert_video(write_video(tmp_path / "odd.gif", frames, fps=4), frames=3, size=(7, 9))
    both = side_by_side([("a", frames), ("b", frames[:2])])
    assert both.shape == (2, LABEL_HEIGHT + 7, 2 * 9 + GAP, 3)


def test_metrics():
    rng = np.random.default_rng(0)
    grey = np.full((5, 64, 64, 3), 128, np.uint8)
    assert metrics.temporal_flicker(grey) == 1.0
    assert metrics.saturation(grey) == 0.0 and metrics.sharpness(grey) == 0.0
    assert metrics.dynamic_degree(grey) == (0.0, 0.0)
    flashing = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)] * 2)
    assert metrics.temporal_flicker(flashing) == 0.0
    red = np.zeros((2, 4, 4, 3), np.uint8)
    red[..., 0] = 200
    assert metrics.saturation(red) == 1.0
    # A smooth texture moving 2 pixels per frame: at a 256-pixel short side that is 8 pixels, above VBench's 6.
    base = (rng.random((16, 16)) * 255).astype(np.float32)
    import cv2

    tex = cv2.resize(base, (96, 96), interpolation=cv2.INTER_CUBIC)
    moving = np.stack([np.repeat(tex[16:80, 16 + 2 * i:80 + 2 * i, None], 3, axis=2) for i in range(8)])
    moving = np.clip(moving, 0, 255).astype(np.uint8)
    dynamic, motion = metrics.dynamic_degree(moving)
    assert dynamic == 1.0 and 6.0 < motion < 12.0, motion
    lap = cv2.Laplacian(moving[0, ..., 0].astype(np.float64), cv2.CV_64F)
    assert np.allclose(metrics.laplacian(moving[0, ..., 0].astype(np.float64)), lap)


def test_normal_flow_fallback_without_opencv(monkeypatch):
    monkeypatch.setattr(metrics, "_opencv", lambda: None)
    assert metrics.flow_method() == "normal_flow"
    x = np.linspace(0, 255, 64)
    ramp = np.broadcast_to(x[None, :, None], (64, 64, 3))
    moving = np.stack([np.roll(ramp, 3 * i, axis=1) for i in range(3)]).astype(np.uint8)
    assert metrics.dynamic_degree(moving)[1] > 0
