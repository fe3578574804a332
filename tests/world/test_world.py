"""stg_ext.world: clips are fixed by their seed, the masks are the rendered pixels, the ground truth follows the
prompt, and the splits never share a (shape, color, motion) combination."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from stg_ext.world import (BACKGROUNDS, COLORS, FRAMES, MOTIONS, SHAPES, SIZE, SIZES, combo_split, combos, render,
                           sample_spec, single_object_prompts, spec_for_prompt, valid_combos)
from stg_ext.world.render import background
from stg_ext.world.scene import BOUNCE_HEIGHT, GROW_FROM, GROW_TO, TRAVEL, PromptSpec, max_radius

SEEDS = range(40)


def test_same_seed_same_clip_and_seeds_differ():
    for split in ("train", "eval"):
        a, b = render(sample_spec(split, 7)), render(sample_spec(split, 7))
        assert a.spec == b.spec and a.prompt == b.prompt
        for field in ("video", "masks", "visible", "centers", "radii", "angles"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
    videos = [render(sample_spec("train", s)).video for s in range(10)]
    assert all(not np.array_equal(x, y) for x, y in itertools.combinations(videos, 2))
    # The split is part of the draw: the same seed in two splits gives two different clips.
    assert sample_spec("train", 3).prompt != sample_spec("eval", 3).prompt


def test_clip_shapes_and_range():
    clip = render(sample_spec("train", 0))
    n = len(clip.spec.objects)
    assert clip.video.shape == (FRAMES, SIZE, SIZE, 3) and clip.video.dtype == np.float32
    assert clip.masks.shape == clip.visible.shape == (n, FRAMES, SIZE, SIZE)
    assert clip.centers.shape == (n, FRAMES, 2) and clip.radii.shape == clip.angles.shape == (n, FRAMES)
    assert 0.0 <= clip.video.min() and clip.video.max() <= 1.0


@pytest.mark.parametrize("split", ["train", "eval"])
def test_masks_are_the_rendered_pixels(split):
    for seed in SEEDS:
        clip = render(sample_spec(split, seed))
        bg = background(clip.spec.background, clip.spec.offset)
        covered = clip.visible.any(axis=0)
        # Outside every object: exactly the background; inside an object's visible mask: exactly its color.
        assert np.array_equal(clip.video[~covered], np.broadcast_to(bg, clip.video.shape)[~covered])
        for i, obj in enumerate(clip.spec.objects):
            assert np.all(clip.video[clip.visible[i]] == np.asarray(COLORS[obj.color], dtype=np.float32))
            assert clip.visible[i].sum() > 0
            # The full mask is the visible one plus what later objects cover.
            later = clip.masks[i + 1:].any(axis=0) if i + 1 < len(clip.masks) else np.zeros_like(covered)
            assert np.array_equal(clip.visible[i], clip.masks[i] & ~later)
        # The placement keeps a disc of the shape's (largest) half extent inside the frame for the whole motion,
        # so no circle, square or cross ever touches the border; a triangle's vertices reach 1.25 half extents
        # out and may touch it (the world the shipped model was trained on has it so).
        border = np.zeros((SIZE, SIZE), dtype=bool)
        border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
        for i, obj in enumerate(clip.spec.objects):
            r = max_radius(obj.size, obj.motion) * SIZE
            assert np.all(clip.centers[i] >= r) and np.all(clip.centers[i] <= SIZE - r), clip.prompt
            if obj.shape != "triangle":
                assert not (clip.masks[i] & border).any(), clip.prompt


def test_ground_truth_follows_the_prompt():
    for shape, color, motion in valid_combos():
        for size in SIZES:
            clip = render(spec_for_prompt(PromptSpec(((shape, color, size, motion),), "black"), seed=1))
            assert clip.prompt == f"a {size} {color} {shape} " + {
                "left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
                "bounce": "bouncing", "grow": "growing", "rotate": "rotating"}[motion] + " on a black background"
            c, r, a = clip.centers[0], clip.radii[0], clip.angles[0]
            dx, dy = c[-1] - c[0]
            travel = TRAVEL * SIZE
            expected = {"left": (-travel, 0), "right": (travel, 0), "up": (0, -travel), "down": (0, travel)}
            if motion in expected:
                assert np.allclose((dx, dy), expected[motion], atol=1e-4)
            else:
                assert np.allclose((dx, dy), 0, atol=1e-4)
            if motion == "bounce":
                assert np.isclose(c[0, 1] - c[:, 1].min(), BOUNCE_HEIGHT * SIZE, atol=0.6)
            assert np.isclose(r[-1] / r[0], GROW_TO / GROW_FROM if motion == "grow" else 1.0, rtol=1e-4)
            assert (a[-1] != a[0]) == (motion == "rotate")
            # The mask's centroid is the recorded centre (every shape here is point-symmetric or nearly so).
            mask = clip.masks[0]
            ys, xs = np.nonzero(mask[0])
            tol = 1.2 if shape == "triangle" else 0.55
            assert np.allclose([xs.mean() + 0.5, ys.mean() + 0.5], c[0], atol=tol), (shape, motion)
            # Masks move with the centre: left/right/up/down shift the centroid by the travel.
            if motion in expected:
                ys1, xs1 = np.nonzero(mask[-1])
                assert np.allclose([xs1.mean() - xs.mean(), ys1.mean() - ys.mean()], expected[motion], atol=0.8)


def test_shapes_differ_and_sizes_order():
    areas = {}
    for shape in SHAPES:
        for size in SIZES:
            clip = render(spec_for_prompt(PromptSpec(((shape, "red", size, "left"),), "black"), seed=0))
            areas[shape, size] = clip.masks[0, 0].sum()
    for shape in SHAPES:
        assert areas[shape, "large"] > 1.8 * areas[shape, "small"]
    # Shapes of one size are distinct pixel sets at the same centre.
    masks = {s: render(spec_for_prompt(PromptSpec(((s, "red", "large", "grow"),), "black"), seed=0)).masks[0, -1]
             for s in SHAPES}
    for a, b in itertools.combinations(SHAPES, 2):
        assert (masks[a] != masks[b]).sum() >= 8, (a, b)


def test_backgrounds():
    assert np.all(background("black") == 0) and np.all(background("gray") == background("gray")[0, 0])
    checker = background("checkered")
    assert len(np.unique(checker)) == 2
    for color in COLORS.values():  # no object color is a background level
        assert not np.any(np.all(checker == np.asarray(color, dtype=np.float32), axis=-1))


def test_splits_partition_the_combinations():
    all_combos = set(valid_combos())
    assert len(all_combos) == len(SHAPES) * len(COLORS) * len(MOTIONS) - len(COLORS)  # no rotating circle
    parts = {split: set(combos(split)) for split in ("train", "sweep", "eval")}
    assert set().union(*parts.values()) == all_combos
    for a, b in itertools.combinations(parts, 2):
        assert not parts[a] & parts[b], (a, b)
    assert len(parts["eval"]) >= 16 and len(parts["sweep"]) >= 16
    # Every pair of attribute values a held-out combination uses was seen in training.
    train = parts["train"]
    for held in parts["eval"] | parts["sweep"]:
        s, c, m = held
        assert any(t[0] == s and t[1] == c for t in train)
        assert any(t[0] == s and t[2] == m for t in train)
        assert any(t[1] == c and t[2] == m for t in train)


def test_sampled_clips_stay_in_their_split():
    for split in ("train", "sweep", "eval"):
        for seed in range(200):
            spec = sample_spec(split, seed)
            assert all(combo_split(o.combo) == split for o in spec.objects)
            assert spec.background in BACKGROUNDS
            if len(spec.objects) == 2:
                a, b = spec.objects
                assert (a.shape, a.color) != (b.shape, b.color)
    assert any(len(sample_spec("train", s).objects) == 2 for s in range(50))
    # No held-out prompt is ever a training prompt.
    train_prompts = {sample_spec("train", s).prompt for s in range(3000)}
    held = {p.prompt for split in ("sweep", "eval") for p in single_object_prompts(split)}
    assert not train_prompts & held
    assert len(single_object_prompts("eval")) == len(combos("eval")) * len(SIZES) * len(BACKGROUNDS)
