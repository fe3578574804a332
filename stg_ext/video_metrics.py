"""Model-free video statistics for `stg-ext sweep` (the paper's layer selection, appendix A3, scores layers
with VBench; these are the parts of VBench and of the paper's failure analysis that need no network).

All take (T, H, W, 3) uint8 RGB frames.

- temporal_flicker: VBench's Temporal Flickering score, (255 - mean |frame[i+1] - frame[i]|) / 255, the mean
  absolute difference taken over all pixels and channels of each consecutive pair, then over pairs. 1 = no
  change at all between frames.
- motion / dynamic: VBench's Dynamic Degree with OpenCV's Farneback optical flow in place of RAFT. For each
  consecutive pair, the mean of the largest 5% of flow magnitudes; `motion` is their mean, in pixels at a
  256-pixel short side; `dynamic` is VBench's per-video decision: 1 when at least round(4 T / 16) (and at least
  one) pairs exceed 6 pixels at that scale, else 0. Averaged over videos, `dynamic` is VBench's dynamic degree.
  Without OpenCV, the flow is the normal flow of the brightness-constancy equation, |dI/dt| / |grad I| where
  |grad I| > 4 (grey levels per pixel), else 0: it sees only motion across edges, so it reads lower than
  Farneback on the same video; `flow_method` in the outputs says which one was used.
- saturation: the mean HSV saturation (max - min) / max of RGB, in [0, 1]. Over-saturation is STG's known
  failure at large scales (paper Fig. 9), hence it is compared with the CFG render of the same prompt and seed.
- sharpness: the variance of the Laplacian (4-neighbour kernel, reflected borders, as cv2.Laplacian with its
  default ksize 1) of the grey image (ITU-R 601 luma), averaged over frames.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

TOP_FRACTION = 0.05  # VBench: the mean of the largest 5% of flow magnitudes
VBENCH_THRESHOLD = 6.0  # VBench: pixels at a 256-pixel short side
VBENCH_SHORT_SIDE = 256.0
NORMAL_FLOW_MIN_GRADIENT = 4.0


def temporal_flicker(frames: np.ndarray) -> float:
    if len(frames) < 2:
        return 1.0
    f = frames.astype(np.int16)
    mean_abs = float(np.mean([np.abs(f[i + 1] - f[i]).mean() for i in range(len(f) - 1)]))
    return (255.0 - mean_abs) / 255.0


def _grey(frames: np.ndarray) -> np.ndarray:
    f = frames.astype(np.float64)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def _opencv():
    try:
        import cv2

        return cv2
    except ImportError:
        return None


def flow_method() -> str:
    return "farneback" if _opencv() is not None else "normal_flow"


def _pair_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel flow magnitude between two grey frames (float64, 0..255)."""
    cv2 = _opencv()
    if cv2 is not None:
        a8, b8 = (np.clip(np.rint(x), 0, 255).astype(np.uint8) for x in (a, b))
        levels = max(0, min(3, int(np.log2(max(1, min(a.shape) // 8)))))
        flow = cv2.calcOpticalFlowFarneback(a8, b8, None, 0.5, levels, 15, 3, 5, 1.2, 0)
        return np.hypot(flow[..., 0], flow[..., 1])
    mid = (a + b) / 2.0
    gy, gx = np.gradient(mid)
    grad = np.hypot(gx, gy)
    out = np.zeros_like(mid)
    edge = grad > NORMAL_FLOW_MIN_GRADIENT
    out[edge] = np.abs(b - a)[edge] / grad[edge]
    return out


def pair_motion(frames: np.ndarray) -> List[float]:
    """For each consecutive pair, the mean of its top 5% flow magnitudes, in pixels at a 256-pixel short side."""
    grey = _grey(frames)
    scale = VBENCH_SHORT_SIDE / min(frames.shape[1:3])
    out = []
    for i in range(len(grey) - 1):
        mag = np.sort(_pair_flow(grey[i], grey[i + 1]).ravel())[::-1]
        top = mag[:max(1, int(mag.size * TOP_FRACTION))]
        out.append(float(top.mean()) * scale)
    return out


def dynamic_degree(frames: np.ndarray) -> Tuple[float, float]:
    """(dynamic, motion): VBench's per-video 0/1 decision and the mean top-5% flow (see the module doc)."""
    scores = pair_motion(frames)
    if not scores:
        return 0.0, 0.0
    needed = max(1, round(4 * len(frames) / 16.0))
    dynamic = float(sum(s > VBENCH_THRESHOLD for s in scores) >= needed)
    return dynamic, float(np.mean(scores))


def saturation(frames: np.ndarray) -> float:
    f = frames.astype(np.float64)
    hi, lo = f.max(axis=-1), f.min(axis=-1)
    s = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
    return float(s.mean())


def laplacian(grey: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian with reflect-101 borders (cv2.Laplacian's default, ksize=1)."""
    p = np.pad(grey, 1, mode="reflect")
    return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4.0 * p[1:-1, 1:-1]


def sharpness(frames: np.ndarray) -> float:
    return float(np.mean([laplacian(g).var() for g in _grey(frames)]))


#: The columns video_metrics returns, in order.
METRICS = ("temporal_flicker", "dynamic", "motion", "saturation", "sharpness")


def video_metrics(frames: np.ndarray) -> Dict[str, float]:
    dynamic, motion = dynamic_degree(frames)
    return {"temporal_flicker": temporal_flicker(frames), "dynamic": dynamic, "motion": motion,
            "saturation": saturation(frames), "sharpness": sharpness(frames)}
