"""Keeps a pipeline's own `guidance_rescale` right under STG.

Batched pipelines with `guidance_rescale` (LTX, EasyAnimate) call `rescale_noise_cfg(noise_pred,
noise_pred_text, guidance_rescale)` after their CFG line. Under STG, `noise_pred_text` is the folded `c'`, not
the model's `c`, so the std they rescale to would be wrong. While a session is attached, the pipeline module's
`rescale_noise_cfg` is wrapped: when its `noise_pred_text` is exactly the `c'` a session just returned, the
wrapper passes that session's `c` instead; any other call goes through unchanged. The module attribute is
restored when the last session using that module is removed.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List

import torch

FUNCTION = "rescale_noise_cfg"
_ORIGINALS: Dict[str, Callable] = {}  # pipeline module name -> its own rescale_noise_cfg
_SESSIONS: Dict[str, List[Any]] = {}  # pipeline module name -> sessions relying on the wrapper


def _cond_for(noise_pred_text: torch.Tensor, sessions: List[Any]) -> torch.Tensor:
    for session in sessions:
        for driver in session.drivers.values():
            last = getattr(driver, "last_fold", None)
            if last is None:
                continue
            c, c_folded = last
            if c_folded.shape != noise_pred_text.shape:
                continue
            # The pipeline's noise_pred_text is a chunk of what the driver returned (same storage, no device sync)
            # or, when the pipeline upcast it first (a bf16 model), a copy: then the values are compared (a device sync).
            joined = getattr(driver, "last_output", None)
            same_storage = (joined is not None
                            and noise_pred_text.untyped_storage().data_ptr() == joined.untyped_storage().data_ptr())
            if same_storage or torch.equal(c_folded.to(noise_pred_text.dtype), noise_pred_text):
                return c.to(noise_pred_text.dtype)
    return noise_pred_text


def _wrapper(module_name: str, original: Callable) -> Callable:
    def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=0.0):
        noise_pred_text = _cond_for(noise_pred_text, _SESSIONS.get(module_name, []))
        return original(noise_cfg, noise_pred_text, guidance_rescale=guidance_rescale)

    rescale_noise_cfg.__wrapped__ = original
    return rescale_noise_cfg


def _modules(pipe: Any) -> List[str]:
    """The modules of the pipeline's class hierarchy (a user subclass runs the stock class's loop)."""
    return list(dict.fromkeys(cls.__module__ for cls in type(pipe).__mro__))


def attach(session: Any, pipe: Any) -> None:
    """While `session` is attached, `pipe`'s module functions see the model's c (one wrapper per module)."""
    for name in _modules(pipe):
        module = sys.modules.get(name)
        if module is None or not callable(getattr(module, FUNCTION, None)):
            continue
        if name not in _ORIGINALS:
            _ORIGINALS[name] = getattr(module, FUNCTION)
            setattr(module, FUNCTION, _wrapper(name, _ORIGINALS[name]))
        sessions = _SESSIONS.setdefault(name, [])
        if session not in sessions:
            sessions.append(session)


def detach(session: Any) -> None:
    for name in list(_SESSIONS):
        sessions = _SESSIONS[name]
        if session in sessions:
            sessions.remove(session)
        if not sessions:
            setattr(sys.modules[name], FUNCTION, _ORIGINALS.pop(name))
            del _SESSIONS[name]
