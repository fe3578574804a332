"""A procedural video world with known truth: flat shapes that move over plain or checkered backgrounds.

    from stg_ext.world import sample_spec, render
    clip = render(sample_spec("train", seed=0))
    clip.prompt, clip.video.shape, clip.masks.shape   # "a small red circle moving left on a black background"

Each clip comes with its prompt and its ground truth (per-frame masks, centres, sizes, angles). Clips are fixed
by their seed; the "train", "sweep" and "eval" splits use disjoint (shape, color, motion) combinations (see
`stg_ext.world.scene`). The model shipped with the package (`stg_ext.world.model_path()`) was trained on the
"train" split by scripts/train_world_model.py.
"""
from __future__ import annotations

from pathlib import Path

from .render import FRAMES, SIZE, Clip, render, shape_mask, trajectory
from .scene import (BACKGROUNDS, COLORS, MOTIONS, SHAPES, SIZES, SPLITS, ClipSpec, ObjectSpec, PromptSpec, combo_split,
                    combos, sample_spec, single_object_prompts, spec_for_prompt, valid_combos)

MODEL_DIR = Path(__file__).resolve().parent / "model"


def model_path() -> Path:
    """The folder of the shipped world model (a diffusers WanPipeline saved with save_pretrained)."""
    return MODEL_DIR


__all__ = ["FRAMES", "SIZE", "Clip", "render", "shape_mask", "trajectory", "BACKGROUNDS", "COLORS", "MOTIONS",
           "SHAPES", "SIZES", "SPLITS", "ClipSpec", "ObjectSpec", "PromptSpec", "combo_split", "combos",
           "sample_spec", "single_object_prompts", "spec_for_prompt", "valid_combos", "model_path", "MODEL_DIR"]
