"""The cond samples of a batched `[uncond, cond]` call, for any module whose forward the adapters describe."""
from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import nn

from .adapters.base import ModelAdapter, _PARAMS, read_signature


def _take(value: Any, batch: int, half: slice) -> Any:
    if isinstance(value, torch.Tensor):
        return value[half] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _take(v, batch, half) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, batch, half) for v in value)
    return value


def cond_half(module: nn.Module, adapter: ModelAdapter, args: tuple, kwargs: dict, batch: int
              ) -> Tuple[tuple, dict]:
    """The call arguments of the cond samples (the second half) of a batched `[uncond, cond]` call: every
    per-sample tensor whose batch dimension is `batch` is sliced (a view, no copy); the adapter's
    `shared_inputs` (rotary tables, kwargs dicts) are not."""
    read_signature(module)
    names = _PARAMS[type(module)][0]
    half = slice(batch // 2, batch)
    shared = set(adapter.shared_inputs)
    new_args = tuple(a if i < len(names) and names[i] in shared else _take(a, batch, half)
                     for i, a in enumerate(args))
    new_kwargs = {k: v if k in shared else _take(v, batch, half) for k, v in kwargs.items()}
    return new_args, new_kwargs
