"""Loads the compiled ops (`stg_ext._C`) if they are there; says once, in the log, why not otherwise."""
from __future__ import annotations

import logging
import os

import torch  # must be imported before the extension: it links against libtorch

logger = logging.getLogger("stg_ext")

DISABLE_ENV = "STG_EXT_DISABLE_EXTENSION"

unavailable_reason: str | None = None
if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
    unavailable_reason = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
else:
    try:
        from stg_ext import _C  # noqa: F401  (registers torch.ops.stg_ext.*)
    except Exception as exc:  # ImportError, or an OSError from a broken build
        unavailable_reason = f"stg_ext._C did not load: {type(exc).__name__}: {exc}"

if unavailable_reason is not None:
    logger.warning("stg_ext: compiled ops unavailable (%s); using the PyTorch reference instead",
                   unavailable_reason)


def available() -> bool:
    """True when torch.ops.stg_ext.* from the compiled extension are registered."""
    return unavailable_reason is None


_OPS = ("combine", "identity_joint_attention")
_DISPATCH_KEYS = ("CPU", "CUDA")
# Looked up once: a plain dict read is traceable by torch.compile, the dispatcher query is not.
_KERNELS = {
    (op, key): available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"stg_ext::{op}", key)
    for op in _OPS
    for key in _DISPATCH_KEYS
}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when the compiled op `stg_ext::<op>` has a kernel for `dispatch_key` ("CPU", "CUDA")."""
    return _KERNELS.get((op, dispatch_key), False)


# Fake (meta) kernels of the compiled ops, so that torch.compile traces them without running them.
if available():

    @torch.library.register_fake("stg_ext::combine")
    def _combine_fake(cond, perturbed, uncond, cfg_tensor, cfg_scale, stg_scales, rescale, orthogonalize, fold):
        return torch.empty_like(cond, memory_format=torch.contiguous_format)

    @torch.library.register_fake("stg_ext::identity_joint_attention")
    def _identity_joint_attention_fake(q_video, k_video, v_video, k_text, v_text, text_bias, scale):
        return q_video.new_empty(q_video.shape, dtype=v_video.dtype)  # contiguous, like the kernels' output
