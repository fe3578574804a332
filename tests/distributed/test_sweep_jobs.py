"""Sweeps and evals across processes (issue 14): `torchrun --nproc-per-node 2 -m stg_ext sweep ...` splits its
(prompt, seed, layer) renders over the ranks and rank 0 writes the same runs.csv and sweep.csv as one process (every
column but the timings); `eval` splits its (method, prompt, seed) renders, and its layer sweep, the same way."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

from stg_ext.testing.distributed import run_group
from tests.distributed._workers import jobs_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMINGS = {"seconds", "seconds_per_video", "denoiser_seconds_per_video", "time_vs_cfg"}
SWEEP = ["sweep", "tiny:wan", "--layers", "0:3", "--steps", "2", "--seeds", "0,1", "--num-prompts", "1", "--quiet"]


def test_jobs_go_round_robin_and_come_back_in_order():
    out = run_group(jobs_worker, 3, 8, timeout=120)
    assert [o["mine"] for o in out] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert [r["job"] for r in out[0]["rows"]] == list(range(8))
    assert [r["rank"] for r in out[0]["rows"]] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert out[1]["rows"] == [] and out[2]["rows"] == []
    assert all(o["distributed"] and not o["owned"] for o in out)


def _rows(path):
    with open(path) as fh:
        lines = [line for line in fh if not line.startswith("#")]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(lines)]


def _one_and_two_processes(argv, tmp_path):
    """Runs `python -m stg_ext ARGV` in one process and under torchrun in two; returns the two --out folders and
    the torchrun process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "stg_ext", *argv, "--out", str(one)], check=True, env=env, cwd=ROOT,
                   timeout=300, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run([*torchrun, "-m", "stg_ext", *argv, "--out", str(two)], env=env, cwd=ROOT, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two, proc


def test_torchrun_sweep_writes_the_one_process_csv(tmp_path):
    one, two, proc = _one_and_two_processes(SWEEP, tmp_path)
    for name in ("runs.csv", "sweep.csv"):
        assert _rows(one / name) == _rows(two / name), name
    assert len(_rows(two / "runs.csv")) == 8  # (CFG + 3 layers) x 2 seeds
    assert proc.stdout.count("best layer:") == 1  # rank 0 alone reports


def test_torchrun_eval_writes_the_one_process_tables(tmp_path):
    # STG-R's layer from eval's own sweep (split over the ranks too; rank 0 tells the others the pick)
    argv = ["eval", "--prompts", "2", "--seeds", "0", "--steps", "2", "--methods", "CFG,CFG+STG-R,CFG+STG-A",
            "--layer-a", "6", "--sweep-prompts", "1", "--bootstrap", "20", "--quiet", "--threads", "1"]
    one, two, proc = _one_and_two_processes(argv, tmp_path)
    for name in ("eval.csv", "videos.csv", "sweep_residual/runs.csv", "sweep_residual/sweep.csv"):
        assert _rows(one / name) == _rows(two / name), name
    assert [r["method"] for r in _rows(two / "eval.csv")] == ["real", "real via the VAE", "CFG", "CFG+STG-R",
                                                               "CFG+STG-A"]
    assert proc.stdout.count("| CFG+STG-R |") == 1  # rank 0 alone prints the table
