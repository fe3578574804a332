"""Drawing a `ClipSpec`: frames, and the ground truth of every object in every frame.

Shapes are drawn with hard edges at pixel centres: a pixel belongs to a shape exactly when its centre lies
inside it, so the masks are the rendered pixels (no anti-aliasing blurs the truth). Objects are painted in
order; a later one covers an earlier one where they overlap (`visible` masks say who is seen where).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .scene import (BOUNCE_HEIGHT, COLORS, GROW_FROM, GROW_TO, ROTATE_BY, SIZES, TRAVEL, ClipSpec, ObjectSpec)

SIZE = 32  # frame side (pixels)
FRAMES = 13  # frames per clip (1 + 2k: the world model's VAE halves time causally)
BACKGROUND_LEVELS = {"black": (0.0, 0.0), "gray": (0.40, 0.40), "checkered": (0.16, 0.34)}
CHECKER = 4  # checkerboard cell (pixels at 32 x 32)


@dataclass
class Clip:
    spec: ClipSpec
    video: np.ndarray  # (T, H, W, 3) float32 in [0, 1]
    masks: np.ndarray  # (objects, T, H, W) bool: each object's full shape (where it would be seen alone)
    visible: np.ndarray  # (objects, T, H, W) bool: where it is seen (later objects cover earlier ones)
    centers: np.ndarray  # (objects, T, 2) float32: (x, y) of each shape's centre in pixels
    radii: np.ndarray  # (objects, T) float32: half extent in pixels
    angles: np.ndarray  # (objects, T) float32: radians

    @property
    def prompt(self) -> str:
        return self.spec.prompt


def trajectory(obj: ObjectSpec, frames: int = FRAMES, size: int = SIZE) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre (T, 2) in pixels, half extent (T,) in pixels and angle (T,) of an object over the clip."""
    u = np.linspace(0.0, 1.0, frames)
    x = np.full(frames, obj.x)
    y = np.full(frames, obj.y)
    r = np.full(frames, SIZES[obj.size])
    a = np.full(frames, obj.angle)
    if obj.motion == "left":
        x = obj.x - TRAVEL * u
    elif obj.motion == "right":
        x = obj.x + TRAVEL * u
    elif obj.motion == "up":
        y = obj.y - TRAVEL * u
    elif obj.motion == "down":
        y = obj.y + TRAVEL * u
    elif obj.motion == "bounce":  # two hops off the floor at y
        y = obj.y - BOUNCE_HEIGHT * np.abs(np.sin(2 * np.pi * u))
    elif obj.motion == "grow":
        r = SIZES[obj.size] * (GROW_FROM + (GROW_TO - GROW_FROM) * u)
    elif obj.motion == "rotate":
        a = obj.angle + ROTATE_BY * u
    centers = np.stack([x, y], axis=1) * size
    return centers.astype(np.float32), (r * size).astype(np.float32), a.astype(np.float32)


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int = SIZE) -> np.ndarray:
    """(size, size) bool: the pixels whose centres lie inside the shape."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # coordinates in the shape's own frame
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = r * 0.86  # about a circle's area
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "triangle":  # equilateral, a vertex at angle -90 degrees (pointing up at angle 0)
        R = r * 1.25
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            t = -math.pi / 2 + 2 * math.pi * k / 3 + math.pi  # outward normal of the side opposite vertex k
            inside &= u * math.cos(t) + v * math.sin(t) <= R / 2
        return inside
    if shape == "cross":
        w = r * 0.38
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    raise ValueError(f"unknown shape {shape!r}")


def background(name: str, offset: Tuple[int, int] = (0, 0), size: int = SIZE) -> np.ndarray:
    """(size, size, 3) float32 background."""
    lo, hi = BACKGROUND_LEVELS[name]
    cell = max(1, CHECKER * size // SIZE)
    ys, xs = np.mgrid[0:size, 0:size]
    checker = ((xs + offset[0]) // cell + (ys + offset[1]) // cell) % 2 == 1
    level = np.where(checker, hi, lo).astype(np.float32)
    return np.repeat(level[:, :, None], 3, axis=2)


def render(spec: ClipSpec, frames: int = FRAMES, size: int = SIZE) -> Clip:
    n = len(spec.objects)
    video = np.repeat(background(spec.background, spec.offset, size)[None], frames, axis=0)
    masks = np.zeros((n, frames, size, size), dtype=bool)
    centers = np.zeros((n, frames, 2), dtype=np.float32)
    radii = np.zeros((n, frames), dtype=np.float32)
    angles = np.zeros((n, frames), dtype=np.float32)
    for i, obj in enumerate(spec.objects):
        centers[i], radii[i], angles[i] = trajectory(obj, frames, size)
        color = np.asarray(COLORS[obj.color], dtype=np.float32)
        for t in range(frames):
            m = shape_mask(obj.shape, centers[i, t, 0], centers[i, t, 1], radii[i, t], angles[i, t], size)
            masks[i, t] = m
            video[t][m] = color
    visible = masks.copy()
    for i in range(n):
        for j in range(i + 1, n):
            visible[i] &= ~masks[j]
    return Clip(spec, video, masks, visible, centers, radii, angles)
