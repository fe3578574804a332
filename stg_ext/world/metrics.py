"""Metrics of a generated clip against what its (one-object) prompt asks for, from the world's ground truth.

Every function takes frames as (T, H, W, 3) uint8 (what a pipeline's output becomes in stg_ext.cli) and the
`PromptSpec` the clip was generated from.

- segment: the object is what differs from the prompt's background: a pixel is foreground when its RGB
  distance (in [0, 1] units) to every level of that background exceeds FOREGROUND_DISTANCE; the largest
  8-connected foreground component of each frame is the object.
- object_iou: per frame, the IoU of the object with the ideal shape of the prompt (its shape at its size,
  grown as `grow` prescribes, upright unless it rotates; a rotating one at its best angle) centred on the
  object's centroid; frames without an object count 0. Mean over frames.
- trajectory_error: the mean distance (pixels) between the object's displacement from frame 0 and the
  prompted motion's (stg_ext.world.render.trajectory); a clip with fewer than two frames holding an object gets
  MISSING_MOTION_ERROR (the whole travel of a moving prompt).
- jerk: the mean magnitude of the centroid's second difference (pixels / frame^2) minus the prompted path's
  own (bounce has corners): how unsteadily the object moves. 0 for a clip that follows a smooth path exactly.
- temporal_flicker, sharpness: stg_ext.video_metrics (VBench's temporal flickering; Laplacian variance).
- frechet_distance: between two feature sets (the classifier's), with means and covariances.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np

from .render import BACKGROUND_LEVELS, FRAMES, SIZE, shape_mask, trajectory
from .scene import TRAVEL, ObjectSpec, PromptSpec
from .. import video_metrics

FOREGROUND_DISTANCE = 0.2
MISSING_MOTION_ERROR = TRAVEL * SIZE
ROTATION_GRID = 16  # angles tried for a rotating shape (0 .. 90 degrees)


def _components(mask: np.ndarray) -> np.ndarray:
    import cv2

    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, dtype=bool)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def segment(frames: np.ndarray, background: str) -> np.ndarray:
    """(T, H, W) bool: the object in each frame (see the module docstring)."""
    f = frames.astype(np.float32) / 255.0
    levels = sorted(set(BACKGROUND_LEVELS[background]))
    dist = np.min([np.linalg.norm(f - lv, axis=-1) for lv in levels], axis=0)
    return np.stack([_components(m) for m in dist > FOREGROUND_DISTANCE])


def centroids(masks: np.ndarray) -> np.ndarray:
    """(T, 2) pixel centres (x, y) of each frame's mask; NaN where the mask is empty."""
    out = np.full((len(masks), 2), np.nan)
    for t, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            out[t] = xs.mean() + 0.5, ys.mean() + 0.5
    return out


def _ideal(prompt: PromptSpec, frames: int = FRAMES, size: int = SIZE):
    shape, color, z, motion = prompt.objects[0]
    obj = ObjectSpec(shape, color, z, motion, 0.5, 0.5, 0.0)
    return obj, trajectory(obj, frames, size)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def object_iou(masks: np.ndarray, prompt: PromptSpec) -> float:
    obj, (_, radii, _) = _ideal(prompt, len(masks), masks.shape[-1])
    c = centroids(masks)
    angles = np.linspace(0, math.pi / 2, ROTATION_GRID, endpoint=False) if obj.motion == "rotate" else [0.0]
    ious = []
    for t, m in enumerate(masks):
        if np.isnan(c[t, 0]):
            ious.append(0.0)
            continue
        ious.append(max(_iou(m, shape_mask(obj.shape, c[t, 0], c[t, 1], radii[t], a, m.shape[-1])) for a in angles))
    return float(np.mean(ious))


def trajectory_error(masks: np.ndarray, prompt: PromptSpec) -> float:
    _, (ideal, _, _) = _ideal(prompt, len(masks), masks.shape[-1])
    c = centroids(masks)
    ok = ~np.isnan(c[:, 0])
    if ok.sum() < 2:
        return float(MISSING_MOTION_ERROR)
    first = int(np.argmax(ok))
    moved = c[ok] - c[first]
    wanted = ideal[ok] - ideal[first]
    return float(np.linalg.norm(moved - wanted, axis=1).mean())


def jerk(masks: np.ndarray, prompt: PromptSpec) -> float:
    _, (ideal, _, _) = _ideal(prompt, len(masks), masks.shape[-1])
    c = centroids(masks)
    if np.isnan(c).any() or len(c) < 3:
        return float("nan")
    acc = np.linalg.norm(np.diff(c, n=2, axis=0), axis=1).mean()
    return float(acc - np.linalg.norm(np.diff(ideal, n=2, axis=0), axis=1).mean())


def clip_metrics(frames: np.ndarray, prompt: PromptSpec) -> Dict[str, float]:
    masks = segment(frames, prompt.background)
    return dict(object_iou=object_iou(masks, prompt), trajectory_error=trajectory_error(masks, prompt),
                jerk=jerk(masks, prompt), detected=float(masks.any(axis=(1, 2)).mean()),
                temporal_flicker=video_metrics.temporal_flicker(frames), sharpness=video_metrics.sharpness(frames))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows a (n, d) and b (m, d):
    |mu_a - mu_b|^2 + tr(Ca + Cb - 2 (Ca Cb)^(1/2)), the trace of the root from the eigenvalues of the symmetric
    Ca^(1/2) Cb Ca^(1/2) (the same eigenvalues as Ca Cb)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cb @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(middle, 0, None)).sum())


def bootstrap_ci(values: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaNs dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(len(v), size=(n, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
