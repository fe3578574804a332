"""The cond samples of a batched `[uncond, cond]` call, for any module whose forward the adapters describe."""
from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import torch
from torch import nn

from .adapters.base import ModelAdapter, positional_names


def take(value: Any, batch: int, rows: slice) -> Any:
    """`rows` of every tensor in `value` (nested tuples, lists, dicts) whose batch dimension is `batch`."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: take(v, batch, rows) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(take(v, batch, rows) for v in value)
    return value


def map_per_sample(module: nn.Module, shared: Sequence[str], args: tuple, kwargs: dict,
                   fn: Callable[[Any], Any]) -> Tuple[tuple, dict]:
    """`fn` applied to every argument of a call on `module` except the `shared` ones (per-call data such as
    rotary tables), found by name in the module's signature."""
    names = positional_names(module)
    shared = set(shared)
    new_args = tuple(a if i < len(names) and names[i] in shared else fn(a) for i, a in enumerate(args))
    new_kwargs = {k: v if k in shared else fn(v) for k, v in kwargs.items()}
    return new_args, new_kwargs


def take_rows(module: nn.Module, shared: Sequence[str], args: tuple, kwargs: dict, batch: int, rows: slice
              ) -> Tuple[tuple, dict]:
    """The call arguments of `rows` of a call on `batch` samples: every per-sample tensor (batch dimension
    `batch`) is sliced, a view, no copy."""
    return map_per_sample(module, shared, args, kwargs, lambda v: take(v, batch, rows))


def cond_half(module: nn.Module, adapter: ModelAdapter, args: tuple, kwargs: dict, batch: int
              ) -> Tuple[tuple, dict]:
    """The call arguments of the cond samples (the second half) of a batched `[uncond, cond]` call; the adapter's
    `shared_inputs` (rotary tables, kwargs dicts) stay whole."""
    return take_rows(module, adapter.shared_inputs, args, kwargs, batch, slice(batch // 2, batch))


def cat_rows(a: Any, b: Any) -> Any:
    """Two outputs of the same structure (a tensor, or a tuple of tensors / None) joined along the batch."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, (tuple, list)):
        return type(a)(cat_rows(x, y) for x, y in zip(a, b))
    if a is None:
        return None
    raise TypeError(f"stg_ext: cannot join outputs of type {type(a).__name__} along the batch")
