"""`stg_ext.combine`'s argument forms from the guidance's per-mode lists: one mode passes a tensor and a float,
two modes (spatial and temporal) a tuple of each."""
from __future__ import annotations

from typing import Any, List, Sequence

import torch


def stg_scale_arg(scales: Sequence[float]) -> Any:
    return scales[0] if len(scales) == 1 else tuple(scales)


def perturbed_arg(ps: List[torch.Tensor]) -> Any:
    return ps[0] if len(ps) == 1 else tuple(ps)
