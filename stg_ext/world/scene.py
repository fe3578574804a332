"""The world's vocabulary, its clip descriptions, and how a description is drawn from a seed.

A clip shows one or two flat shapes over a plain or checkered background. Each shape has a shape name, a
color, a size and a motion; the clip's prompt names all of them ("a small red circle moving left on a black
background"). Everything is fixed by the clip's `ClipSpec`, and a spec is drawn from a split and an integer
seed (`sample_spec`), so the same seed always gives the same clip.

Splits are over (shape, color, motion) combinations: `combo_split` puts each of the 135 valid combinations
(a circle does not "rotate" visibly, so circle + rotate is left out) into exactly one of "train", "sweep"
and "eval". The rule k = (3*shape + 5*color + motion) mod 7 gives every (shape, color) pair one "eval" and one
"sweep" motion, and leaves every pair of attribute values (shape-color, shape-motion, color-motion) in the
training set: a held-out prompt is a new combination of things the model has seen, never a new word.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.78, 0.20),
    "blue": (0.18, 0.32, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "white": (0.95, 0.95, 0.95),
}
# Half extent of the shape, as a fraction of the frame side (4.2 and 6.4 px at 32 x 32).
SIZES: Dict[str, float] = {"small": 0.13, "large": 0.20}
MOTIONS: Tuple[str, ...] = ("left", "right", "up", "down", "bounce", "grow", "rotate")
MOTION_WORDS: Dict[str, str] = {"left": "moving left", "right": "moving right", "up": "moving up",
                                "down": "moving down", "bounce": "bouncing", "grow": "growing", "rotate": "rotating"}
BACKGROUNDS: Tuple[str, ...] = ("black", "gray", "checkered")
SPLITS: Tuple[str, ...] = ("train", "sweep", "eval")

# Distance travelled by left/right/up/down over the clip, bounce height, growth range, rotation (fractions of
# the frame side / radians).
TRAVEL = 0.42
BOUNCE_HEIGHT = 0.30
GROW_FROM, GROW_TO = 0.55, 1.45
ROTATE_BY = math.pi / 2
TWO_OBJECT_FRACTION = 0.25

Combo = Tuple[str, str, str]  # (shape, color, motion)


def valid_combos() -> List[Combo]:
    return [(s, c, m) for s, c, m in itertools.product(SHAPES, COLORS, MOTIONS) if not (s == "circle" and m == "rotate")]


def combo_split(combo: Combo) -> str:
    """"train", "sweep" or "eval" for a (shape, color, motion) combination (see the module docstring)."""
    shape, color, motion = combo
    k = (3 * SHAPES.index(shape) + 5 * list(COLORS).index(color) + MOTIONS.index(motion)) % 7
    return "eval" if k == 0 else "sweep" if k == 1 else "train"


def combos(split: str) -> List[Combo]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    return [c for c in valid_combos() if combo_split(c) == split]


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    size: str
    motion: str
    # Where the motion starts (left/right/up/down) or stays (the others): pixel coordinates of the centre,
    # as fractions of the frame side; and the starting angle (radians).
    x: float
    y: float
    angle: float = 0.0

    @property
    def combo(self) -> Combo:
        return (self.shape, self.color, self.motion)

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {MOTION_WORDS[self.motion]}"


@dataclass(frozen=True)
class ClipSpec:
    objects: Tuple[ObjectSpec, ...]
    background: str
    offset: Tuple[int, int] = (0, 0)  # the checkerboard's phase (pixels)

    @property
    def prompt(self) -> str:
        return prompt_of(self.objects, self.background)


def prompt_of(objects: Sequence[ObjectSpec], background: str) -> str:
    return " and ".join(o.phrase() for o in objects) + f" on a {background} background"


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for, without the placement a clip adds: (shape, color, size, motion) per object."""

    objects: Tuple[Tuple[str, str, str, str], ...]  # (shape, color, size, motion)
    background: str

    @property
    def prompt(self) -> str:
        return " and ".join(f"a {z} {c} {s} {MOTION_WORDS[m]}" for s, c, z, m in self.objects) + \
            f" on a {self.background} background"


def single_object_prompts(split: str) -> List[PromptSpec]:
    """Every one-object prompt of a split: its combinations x sizes x backgrounds, in a fixed order."""
    return [PromptSpec(((s, c, z, m),), bg) for (s, c, m) in combos(split) for z in SIZES for bg in BACKGROUNDS]


# --------------------------------------------------------------------------------------------------
# Placement: where a motion can start so that the shape stays inside the frame for the whole clip
# --------------------------------------------------------------------------------------------------

def max_radius(size: str, motion: str) -> float:
    r = SIZES[size]
    return r * GROW_TO if motion == "grow" else r * math.sqrt(2) if motion == "rotate" else r


def _place(rng: np.random.Generator, size: str, motion: str) -> Tuple[float, float]:
    r = max_radius(size, motion) + 0.02  # a margin: the shape never touches the border
    lo, hi = r, 1.0 - r
    if motion in ("left", "right", "up", "down"):
        along = rng.uniform(lo + TRAVEL, hi) if motion in ("left", "up") else rng.uniform(lo, hi - TRAVEL)
        across = rng.uniform(lo, hi)
        return (along, across) if motion in ("left", "right") else (across, along)
    if motion == "bounce":  # y is the floor it bounces on
        return rng.uniform(lo, hi), rng.uniform(lo + BOUNCE_HEIGHT, hi)
    return rng.uniform(lo, hi), rng.uniform(lo, hi)


def place(rng: np.random.Generator, shape: str, color: str, size: str, motion: str) -> ObjectSpec:
    x, y = _place(rng, size, motion)
    # Shapes stand upright unless they rotate; a rotating one starts at a random angle.
    angle = float(rng.uniform(0, math.pi / 2)) if motion == "rotate" else 0.0
    return ObjectSpec(shape, color, size, motion, float(x), float(y), angle)


def sample_spec(split: str, seed: int, two_objects: "bool | None" = None) -> ClipSpec:
    """A clip description drawn from `seed`: its objects' combinations come from `split`'s combinations,
    their sizes, backgrounds and placements at random. `two_objects=None` draws it (probability
    TWO_OBJECT_FRACTION); two objects always differ in shape or color, so the prompt tells them apart."""
    rng = np.random.default_rng([seed, SPLITS.index(split) if split in SPLITS else 99])
    pool = combos(split)
    n = 1 + int(rng.random() < TWO_OBJECT_FRACTION) if two_objects is None else 1 + int(two_objects)
    chosen: List[Combo] = []
    while len(chosen) < n:
        c = pool[int(rng.integers(len(pool)))]
        if all((c[0], c[1]) != (o[0], o[1]) for o in chosen):
            chosen.append(c)
    objects = tuple(place(rng, s, c, list(SIZES)[int(rng.integers(len(SIZES)))], m) for s, c, m in chosen)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    offset = (int(rng.integers(8)), int(rng.integers(8)))
    return ClipSpec(objects, background, offset)


def spec_for_prompt(prompt: PromptSpec, seed: int) -> ClipSpec:
    """A clip that shows exactly `prompt` (placement and angle drawn from `seed`): a real clip of a prompt."""
    rng = np.random.default_rng([seed, 1000])
    objects = tuple(place(rng, s, c, z, m) for s, c, z, m in prompt.objects)
    return ClipSpec(objects, prompt.background, (int(rng.integers(8)), int(rng.integers(8))))


__all__ = ["SHAPES", "COLORS", "SIZES", "MOTIONS", "MOTION_WORDS", "BACKGROUNDS", "SPLITS", "Combo", "ObjectSpec",
           "ClipSpec", "PromptSpec", "valid_combos", "combo_split", "combos", "single_object_prompts",
           "sample_spec", "spec_for_prompt", "prompt_of", "max_radius", "place"]
