"""Where a stock pipeline's denoising loop is, read at the moment it calls its denoiser.

Every diffusers video pipeline runs its loop inside `__call__` as `for i, t in enumerate(timesteps)` and sets
`self._num_timesteps` before the loop, and some keep their CFG scale in a local only (HunyuanVideo's
`true_cfg_scale`, Wan 2.2's `current_guidance_scale`, CogVideoX's base scale under dynamic CFG). So the
guidance hook finds the pipeline's `__call__` frame on the stack and reads those values there: nothing in the
pipeline is modified, and the values are the ones the pipeline itself uses at this very call.
"""
from __future__ import annotations

import inspect
import sys
from functools import lru_cache
from types import CodeType
from typing import Any, Dict, FrozenSet, Optional

from torch import nn


@lru_cache(maxsize=None)
def _call_codes(cls: type) -> FrozenSet[CodeType]:
    """The code of every `__call__` defined along a pipeline class's hierarchy (a user subclass may wrap the stock
    `__call__`; the loop runs in the stock one). __call__ is wrapped by torch.no_grad() (functools.wraps keeps
    __wrapped__)."""
    return frozenset(inspect.unwrap(c.__dict__["__call__"]).__code__ for c in cls.__mro__ if "__call__" in c.__dict__)


def _is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "components") and not isinstance(obj, nn.Module)


def pipeline_locals(pipe: Any) -> Optional[Dict[str, Any]]:
    """The local variables of the innermost pipeline `__call__` on the stack that runs a denoising loop, if that
    call is `pipe`'s; else None (not in a loop, or in another pipeline's call, e.g. one sharing the denoiser and
    run from `pipe`'s step callback)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__call__":
            owner = frame.f_locals.get("self")
            if _is_pipeline(owner) and frame.f_code in _call_codes(type(owner)):
                if owner is not pipe:
                    return None
                local = frame.f_locals
                if "i" in local:
                    return local
        frame = frame.f_back
    return None
