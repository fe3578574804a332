"""stg_ext.world.metrics on clips whose truth is known: real clips score (near) perfectly, and each metric
moves the right way when the clip is spoiled in the way it measures."""
from __future__ import annotations

import numpy as np
import pytest

from stg_ext.world import render, spec_for_prompt
from stg_ext.world.metrics import (MISSING_MOTION_ERROR, bootstrap_ci, clip_metrics, frechet_distance, jerk,
                                   object_iou, segment, trajectory_error)
from stg_ext.world.scene import MOTIONS, PromptSpec


def _frames(prompt, seed=0):
    clip = render(spec_for_prompt(prompt, seed))
    return (clip.video * 255).round().astype(np.uint8), clip


@pytest.mark.parametrize("motion", MOTIONS)
@pytest.mark.parametrize("background", ["black", "checkered"])
def test_real_clips_score_near_perfect(motion, background):
    shape = "square" if motion == "rotate" else "circle"
    prompt = PromptSpec(((shape, "red", "large", motion),), background)
    frames, clip = _frames(prompt)
    masks = segment(frames, background)
    assert np.array_equal(masks, clip.masks[0])  # the segmentation recovers the true masks
    assert object_iou(masks, prompt) > 0.97
    assert trajectory_error(masks, prompt) < 0.3
    assert abs(jerk(masks, prompt)) < 0.3
    m = clip_metrics(frames, prompt)
    assert m["detected"] == 1.0 and 0 < m["temporal_flicker"] <= 1


def test_spoiled_clips_score_worse():
    prompt = PromptSpec((("square", "blue", "large", "right"),), "gray")
    frames, clip = _frames(prompt)
    good = segment(frames, "gray")
    # The wrong shape: a circle where a square was asked.
    circle = PromptSpec((("circle", "blue", "large", "right"),), "gray")
    assert object_iou(good, circle) < object_iou(good, prompt) - 0.05
    # The wrong motion: the same clip judged against "left".
    left = PromptSpec((("square", "blue", "large", "left"),), "gray")
    assert trajectory_error(good, left) > 10
    # Shaking: every other frame shifted by 2 pixels.
    shaky = good.copy()
    shaky[1::2] = np.roll(shaky[1::2], 2, axis=1)
    assert jerk(shaky, prompt) > 1.5
    # Nothing there: IoU 0 and the missing-object motion error.
    empty = np.zeros_like(good)
    assert object_iou(empty, prompt) == 0.0 and trajectory_error(empty, prompt) == MISSING_MOTION_ERROR


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 3)), rng.normal(size=(4000, 3))
    assert frechet_distance(a, b) < 0.02
    assert abs(frechet_distance(a, a + 1.0) - 3.0) < 1e-6  # a mean shift of 1 in each of 3 dimensions
    scaled = a * 2.0  # means mu and 2 mu, covariances C and 4C: |mu|^2 + tr(C + 4C - 2 * 2C) = |mu|^2 + tr(C)
    expected = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert abs(frechet_distance(a, scaled) - expected) < 1e-9


def test_bootstrap_ci_covers_the_mean():
    v = np.random.default_rng(1).normal(3.0, 1.0, size=200)
    lo, hi = bootstrap_ci(v)
    assert lo < v.mean() < hi and 0.15 < hi - lo < 0.4
    assert bootstrap_ci(np.array([np.nan, 2.0, 2.0])) == (2.0, 2.0)
