"""`stg-ext eval` end to end on the shipped world model, small: the table's rows, the cost column measured
from block runs (prefix reuse: blocks before the perturbed one run twice per step, from it on three times), and
the real-clip ceiling rows scoring as real clips should."""
from __future__ import annotations

import csv
import json

import pytest

from stg_ext.cli import main
from stg_ext.cli.commands.eval import METHODS, Method, eval_prompts, pick_methods
from stg_ext.cli.errors import UsageError


def _table(path):
    with open(path) as fh:
        return {r["method"]: r for r in csv.DictReader(fh)}


def test_eval_small_run(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--prompts", "2", "--seeds", "0", "--steps", "3", "--methods", "CFG,CFG+STG-A,CFG+STG-R",
                 "--layer-a", "6", "--layer-r", "5", "--bootstrap", "50", "--out", str(out), "--quiet",
                 "--threads", "1"])
    stdout = capsys.readouterr().out
    assert code == 0
    rows = _table(out / "eval.csv")
    assert list(rows) == ["real", "real via the VAE", "CFG", "CFG+STG-A", "CFG+STG-R"]
    L = 8
    assert float(rows["CFG"]["passes_per_step"]) == 2.0
    assert float(rows["CFG+STG-A"]["passes_per_step"]) == pytest.approx(2 + (L - 6) / L)
    assert float(rows["CFG+STG-R"]["passes_per_step"]) == pytest.approx(2 + (L - 5 - 1) / L)  # block 5 skipped
    real = rows["real"]
    assert float(real["object_iou"]) > 0.95 and float(real["all_acc"]) == 1.0
    assert float(real["trajectory_error"]) < 0.5
    for r in rows.values():
        assert float(r["object_iou_lo"]) <= float(r["object_iou"]) <= float(r["object_iou_hi"])
    meta = json.loads((out / "eval.json").read_text())
    assert meta["layers"] == {"attention": 6, "residual": 5} and meta["videos_per_method"] == 2
    with open(out / "videos.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3 * 2
    assert "| CFG+STG-A | 6 |" in stdout


def test_methods_waiting_for_apply_stg_keywords_are_listed_not_faked():
    waiting = Method("x", mode="residual", extra=(("no_such_keyword", 1),))
    assert "no_such_keyword" in waiting.missing()
    assert Method("CFG").missing() is None
    assert {m.name for m in METHODS} >= {"CFG", "CFG+STG-A", "CFG+STG-R", "STG-R (CFG off)", "CFG+STG-R+restart",
                                         "CFG+STG-R uncond", "CFG+STG-R every=2", "CFG+STG-R every=4"}
    with pytest.raises(UsageError):
        pick_methods("CFG,nonsense")


def test_eval_and_sweep_prompts_are_held_out():
    from stg_ext.world import combo_split

    for split in ("eval", "sweep"):
        for p in eval_prompts(10, split):
            assert combo_split((p.objects[0][0], p.objects[0][1], p.objects[0][3])) == split
