"""The public entry points: guidance on a pipeline or a denoiser, the weak model alone, and their removal."""
from __future__ import annotations

from typing import Any

from torch import nn

from .guidance.attached import copied, session_of
from .guidance.callers import apply_to_denoiser, apply_to_pipeline
from .guidance.config import STGConfig
from .guidance.loop import is_pipeline
from .guidance.manual import apply_to_custom_loop
from .guidance.parallel import attach as attach_branch_group
from .guidance.session import remove_session
from .weak.model import perturbed, remove_weak_model, unwrap, weak_model

__all__ = ["apply_stg", "remove_stg", "weak_model", "perturbed"]

_UNSET = object()


def apply_stg(target: Any, layer: Any, mode: Any = "attention", *, scale: Any = 1.0, rescale: Any = 0.0,
              start: float = 0.0, stop: float = 1.0, orthogonalize: bool = False, strategy: str = "sequential",
              placement: str = "cond", every: int = 1, cfg_scale: Any = _UNSET, process_group: Any = None,
              branch_placement: str = "auto"):
    """Turns on STG guidance on `target` in place, removably; returns a handle with `.remove()` (also a context
    manager). Applying again replaces the settings.

    - A stock diffusers pipeline, or the denoiser a stock pipeline calls (`pipe.transformer`, `pipe.unet`): each
      sampling run then samples with STG (STG_SPEC sections 2 and 4) at the pipeline's own CFG scale. On a
      denoiser, the loop of whichever pipeline calls it is followed; the result is that of `apply_stg(pipe, ...)`.
      `mode` may be a tuple of modes (one perturbed pass each, factorized guidance) with `scale` a tuple of the
      same length; `layer`, `scale`, `rescale` may be per step (`layer=stg_ext.per_step([...])`, `scale=[...]`
      of length N); `start`/`stop` bound the window.
    - A denoiser with `cfg_scale=` (a float, a tensor, or None for STG alone): for custom loops; each call on
      `[uncond, cond]` returns `[u, c']` such that your own CFG line yields STG's `f` (`session.set_step(i, n)`
      for windows and per-step settings).

    `strategy="sequential"` (default) computes the perturbed branch from the first perturbed block on, starting
    from the cond pass's activations there (STG_SPEC section 5); `"batched"` carries the perturbed rows in the
    stock call from that block on; `"naive"` runs a full third pass. The weak model alone: `weak_model`.

    `placement="uncond"`: the cheap variant (WanVideoSLG, SkipLayerGuidanceDiTSimple): the uncond pass runs on the
    weak model, `f = u_p + g (c - u_p)`, no perturbed pass of its own (needs CFG; `scale` 0 turns it off).
    `every=k`: within the window the perturbed branch runs on every k-th step; the steps between reuse the last
    guidance delta `c - p` (STG's analogue of FasterCache's CFG cache).

    `process_group=` (a torch.distributed group, every rank running the same pipeline call): each step's branches
    (u, c, the perturbed passes) are spread over the group's ranks and every rank gets the same `f`
    (stg_ext/guidance/parallel.py: the split, `branch_placement=` "auto" | "cond" | "stash" | "full").
    """
    if process_group is not None and (placement != "cond" or every != 1):
        raise ValueError("stg_ext.apply_stg: process_group= spreads STG's own branches (placement='cond', every=1); "
                         f"placement={placement!r}, every={every} have no branch of their own to spread")
    session = _apply(target, layer, mode, scale=scale, rescale=rescale, start=start, stop=stop,
                     orthogonalize=orthogonalize, strategy=strategy, placement=placement, every=every,
                     cfg_scale=cfg_scale)
    try:
        attach_branch_group(session, process_group, branch_placement)  # None: none (also when settings are replaced)
    except Exception:
        session.remove()
        raise
    return session


def _apply(target: Any, layer: Any, mode: Any, *, scale: Any, rescale: Any, start: float, stop: float,
           orthogonalize: bool, strategy: str, placement: str, every: int, cfg_scale: Any):
    config = STGConfig(layer, mode, scale=scale, rescale=rescale, start=start, stop=stop,
                       orthogonalize=orthogonalize, strategy=strategy, placement=placement, every=every)
    if is_pipeline(target):
        if cfg_scale is not _UNSET:
            raise TypeError("stg_ext.apply_stg: cfg_scale is read from the pipeline at each call; pass it to pipe(...)")
        kind = "pipeline"
    elif isinstance(target, nn.Module):
        kind = "denoiser" if cfg_scale is _UNSET else "custom_loop"
    else:
        raise TypeError(f"stg_ext.apply_stg: {type(target).__name__} is neither a diffusers pipeline nor a denoiser "
                        "module")
    holder = unwrap(target) if kind != "pipeline" else target
    earlier = session_of(holder)
    reconfigure = getattr(earlier, "reconfigure", None) if getattr(earlier, "kind", None) == kind else None
    if copied(holder):
        reconfigure = None  # a copy's session follows the original's loop: replaced, not reconfigured
    if reconfigure is not None and reconfigure(config, cfg_scale):
        return earlier  # same hooks, new settings: a compiled denoiser keeps its compiled code
    remove_stg(target)
    if kind == "pipeline":
        session = apply_to_pipeline(target, config)
    elif kind == "denoiser":
        session = apply_to_denoiser(target, config)
    else:
        session = apply_to_custom_loop(target, config, cfg_scale)
    session.kind = kind
    return session


def remove_stg(target: Any) -> None:
    """Removes whatever stg_ext installed on a pipeline or a denoiser: guidance, or a weak model (no-op when
    nothing is installed)."""
    remove_session(target)
    if isinstance(target, nn.Module):
        remove_weak_model(target)

