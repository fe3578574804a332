"""The main tensor of a diffusers return value (a denoiser's prediction, a scheduler step's sample) and the same
value with that tensor replaced, whatever its form: a tensor, a tuple `(tensor, ...)`, or an output dataclass
(its first field)."""
from __future__ import annotations

from typing import Any

import torch


def prediction(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out[next(iter(out.keys()))]


def with_prediction(out: Any, new: torch.Tensor) -> Any:
    """`out` with its main tensor replaced by `new`, in the same structure (a new object; `out` is untouched)."""
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, (tuple, list)):
        return type(out)((new, *out[1:]))
    fields = dict(out.items())
    fields[next(iter(fields))] = new
    return type(out)(**fields)
