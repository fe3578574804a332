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
from types import CodeType
from typing import Any, Dict, Optional


def _call_code(pipeline_cls: type) -> CodeType:
    # __call__ is wrapped by torch.no_grad() (functools.wraps keeps __wrapped__).
    return inspect.unwrap(pipeline_cls.__call__).__code__


def pipeline_locals(pipe: Any) -> Optional[Dict[str, Any]]:
    """The local variables of `pipe.__call__` if it is on the stack (the innermost such call), else None."""
    code = _call_code(type(pipe))
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code and frame.f_locals.get("self") is pipe:
            return frame.f_locals
        frame = frame.f_back
    return None
