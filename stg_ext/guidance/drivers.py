"""Guidance drivers: one per way a pipeline calls its denoiser, not one per pipeline (DESIGN_NOTES).

A driver receives each denoiser call (from `GuidanceHook`), runs the stock call, runs the perturbed branch
when the step asks for it, and returns what the pipeline's own CFG line turns into STG_SPEC section 2's `f`:

- batched `[uncond, cond]` in one call: returns `[u, c']` with `c' = u + (f - u)/g` (`combine(fold=True)`),
  or `f` itself when CFG is off (the batch is `[cond]`); a call with CFG on that carries only the cond half (half
  the rows of the run's first call: a hook outside STG's, such as FasterCache's CFG cache, skipped the uncond
  rows and builds its own u~ from what the call returns) returns `c' = c + (s/g)(c - p)`, which makes
  `u~ + g(c' - u~) = u~ + g(c - u~) + s(c - p)` for whatever u~ that hook builds; STG's rescale needs u
  (`std(f)`), so such a call with rescale is an error;
- separate calls, cond first: the cond call returns `c' = c + (s/g)(c - p)`, which makes `u + g(c' - u) = f`
  whatever `u` is; with STG's rescale, `f` depends on `std(f)`, hence on `u`: the cond call returns `f1/g` (`f1`:
  the prediction at g = 1) and the uncond call `u' = (F - g c')/(1 - g)` for the rescaled `F`, which stays
  bounded as g -> 1 (separate_fold.py); CFG off: the cond call returns `f`.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, List, Optional, Tuple

import torch

from ..weak.adapters.base import ModelAdapter
from ..weak.batch import cond_half
from .branch import PerturbedBranch
from .combine_args import perturbed_arg, stg_scale_arg
from .config import StepSettings
from .outputs import prediction, with_prediction
from .separate_fold import cond_return, uncond_fold
from ..ops import combine

Forward = Callable[..., Any]


# --- the combination ----------------------------------------------------------------------------------------

@dataclass
class Call:
    """One denoiser call as a driver sees it."""

    forward: Forward            # the stock forward (below the guidance hook)
    args: tuple
    kwargs: dict
    branch: PerturbedBranch
    settings: Optional[StepSettings]  # None: STG inactive at this step
    modes: Tuple[str, ...]
    orthogonalize: bool
    cfg_scale: Any               # None: CFG off
    role: str = "cond"           # separate calls: "cond" or "uncond"
    idle_layer: Any = None       # outside the window: the layer whose stash the stock call still takes
    placement: str = "cond"      # "uncond": the uncond pass runs perturbed, no perturbed pass of its own
    run: Any = None              # the sampling run (reused deltas of `every` > 1 belong to one run)
    isolate: Callable[[str], ContextManager] = lambda mode: nullcontext()  # wraps each perturbed pass


def perturbed_predictions(call: Call, args: tuple, kwargs: dict) -> List[torch.Tensor]:
    out = []
    for mode in call.modes:
        with call.isolate(mode):
            out.append(prediction(call.branch.run(call.forward, mode, call.settings.layer, args, kwargs)))
    return out


class DeltaCache:
    """`every` > 1: the guidance delta c - p of the last step that ran the perturbed branch, per mode; a step in
    between uses p = c - delta (so the combination adds s * delta), within the same sampling run."""

    def __init__(self) -> None:
        self.run: Any = None
        self.deltas: Optional[List[torch.Tensor]] = None

    def fresh(self, call: Call) -> bool:
        return call.settings.fresh or self.deltas is None or self.run is not call.run

    def predictions(self, call: Call, c: torch.Tensor, args: tuple, kwargs: dict) -> List[torch.Tensor]:
        if not self.fresh(call):
            return [c - d for d in self.deltas]
        ps = perturbed_predictions(call, args, kwargs)
        self.run, self.deltas = call.run, [c - p for p in ps]
        return ps


def _branch_context(call: Call, cache: DeltaCache, halve: bool):
    """Prefix reuse around a step that runs the perturbed branch; the stash alone (same compiled code, no pass)
    around one that reuses the last delta."""
    if cache.fresh(call):
        return call.branch.reuse(call.settings.layer, halve=halve, n_rows=_rows(call))
    return call.branch.idle(call.settings.layer, halve=halve)


def _needs_cfg(call: Call) -> None:
    if call.cfg_scale is None:
        raise RuntimeError("stg_ext: placement='uncond' perturbs the uncond pass, and this pipeline runs without CFG "
                           "(no uncond pass); use placement='cond' (STG's own perturbed pass), or turn CFG on")


def _rows(call: Call) -> int:
    """The batch size of the call (its latents: `hidden_states`, or `sample` for UNets)."""
    for name in ("hidden_states", "sample"):
        if name in call.kwargs:
            return call.kwargs[name].shape[0]
    return call.args[0].shape[0]


class CFGBatchDriver:
    """Pipelines that call the denoiser once on `[uncond, cond]` (or `[cond]` with CFG off)."""

    def __init__(self, adapter: ModelAdapter, model: torch.nn.Module):
        self.adapter = adapter
        self.model = model
        self.last_fold: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (c, c') of the last fold
        self.last_output: Optional[torch.Tensor] = None  # the [u, c'] it was returned in
        self._cfg: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # a cfg tensor and its checked fp32 form
        self.deltas = DeltaCache()
        self._full: Tuple[Any, int] = (None, 0)  # (run, rows of its first call): the [uncond, cond] batch size

    def _cond_only(self, call: Call) -> bool:
        """Whether a call with CFG on carries the cond half only (see the module docstring). The first call of a
        run has both halves (FasterCache computes the uncond half at its first iteration)."""
        if call.cfg_scale is None:
            return False
        rows = _rows(call)
        if self._full[0] is not call.run or call.run is None:
            self._full = (call.run, rows)
            return False
        return 2 * rows == self._full[1]

    def _cfg_scale(self, g: Any, like: torch.Tensor) -> Any:
        """A per-element CFG scale (SVD's per-frame tensor, the same for a whole run): checked for zeros and
        expanded once per run, not at every step (the expansion is a latent-sized copy)."""
        if not isinstance(g, torch.Tensor):
            return g
        cached = self._cfg
        if cached is None or cached[0] is not g or cached[1].shape != like.shape:
            # An asynchronous check: raises on the CPU at once, on a GPU when the device gets there (no host sync).
            torch._assert_async((g != 0).all(), "stg_ext: the pipeline's cfg_scale tensor has zeros; STG folds by "
                                "dividing by it")
            wide = g.to(torch.promote_types(g.dtype, torch.float32)).expand(like.shape).contiguous()
            self._cfg = cached = (g, wide)
        return cached[1]

    def __call__(self, call: Call) -> Any:
        cond_only = self._cond_only(call)
        halve = call.cfg_scale is not None and not cond_only
        if call.settings is None:
            with call.branch.idle(call.idle_layer, halve=halve):
                return call.forward(*call.args, **call.kwargs)
        if cond_only:
            with _branch_context(call, self.deltas, halve=False):
                return self._cond_half_only(call)
        if call.placement == "uncond":
            _needs_cfg(call)
            # [u_p, c]: the uncond rows run perturbed; the pipeline's CFG line then gives u_p + g (c - u_p).
            with call.branch.live(call.modes[0], call.settings.layer, rows=slice(0, _rows(call) // 2)):
                return call.forward(*call.args, **call.kwargs)
        with _branch_context(call, self.deltas, halve=halve):
            return self._guided(call)

    def _cond_half_only(self, call: Call) -> Any:
        s = call.settings
        if call.placement == "uncond":
            raise RuntimeError("stg_ext: placement='uncond' perturbs the uncond rows, and this call carries only the "
                               "cond half (a hook outside STG's, such as diffusers' FasterCache, skipped them); use "
                               "placement='cond'")
        if s.rescale != 0.0:
            raise RuntimeError("stg_ext: STG's rescale needs u (it rescales f = u + g (c - u) + s (c - p) by std(c)/"
                               "std(f)), and this call carries only the cond half (a hook outside STG's, such as "
                               "diffusers' FasterCache CFG cache, estimates u itself); use rescale=0, or apply_stg "
                               "to the pipeline (STG then runs outside the cache and sees its u estimate)")
        out = call.forward(*call.args, **call.kwargs)
        c = prediction(out)
        ps = self.deltas.predictions(call, c, call.args, call.kwargs)
        g = call.cfg_scale
        if isinstance(g, torch.Tensor):
            stg = combine(c, perturbed_arg(ps), None, stg_scale=stg_scale_arg(s.scales),
                          orthogonalize=call.orthogonalize)
            c_folded = (c.float() + (stg.float() - c.float()) / self._cfg_scale(g, c)).to(c.dtype)
        else:
            # Whatever u~ the outer hook builds: u~ + g (c' - u~) = u~ + g (c - u~) + s (c - p).
            c_folded = combine(c, perturbed_arg(ps), None, stg_scale=stg_scale_arg([w / float(g) for w in s.scales]),
                               orthogonalize=call.orthogonalize)
        return with_prediction(out, c_folded)

    def _guided(self, call: Call) -> Any:
        out = call.forward(*call.args, **call.kwargs)
        s = call.settings
        pred = prediction(out)
        if call.cfg_scale is None:
            ps = self.deltas.predictions(call, pred, call.args, call.kwargs)
            f = combine(pred, perturbed_arg(ps), None, stg_scale=stg_scale_arg(s.scales), rescale=s.rescale,
                        orthogonalize=call.orthogonalize)
            return with_prediction(out, f)
        batch = pred.shape[0]
        if batch % 2:
            raise RuntimeError(f"stg_ext: the pipeline's CFG is on but the denoiser got an odd batch of {batch}; "
                               "expected [uncond, cond]")
        u, c = pred[: batch // 2], pred[batch // 2:]
        args, kwargs = cond_half(self.model, self.adapter, call.args, call.kwargs, batch)
        ps = self.deltas.predictions(call, c, args, kwargs)
        c_folded = combine(c, perturbed_arg(ps), u, cfg_scale=self._cfg_scale(call.cfg_scale, c), cfg_checked=True,
                           stg_scale=stg_scale_arg(s.scales),
                           rescale=s.rescale, orthogonalize=call.orthogonalize, fold=True)
        joined = torch.cat([u, c_folded])
        self.last_fold, self.last_output = (c, c_folded), joined
        return with_prediction(out, joined)


class SeparateDriver:
    """Pipelines that call the denoiser for cond, then (CFG on) for uncond, at every step."""

    def __init__(self) -> None:
        self.expect_uncond: Optional[int] = None  # the step whose uncond call is still to come
        self.pending: Optional[dict] = None  # what the cond call left for the uncond call of the same step
        self.deltas = DeltaCache()

    def role(self, context_name: Optional[str], step: int, cfg_on: bool) -> str:
        if context_name in ("cond", "uncond"):
            return context_name
        # No cache context: the cond call comes first in every step (all of diffusers' separate-call loops).
        return "uncond" if cfg_on and self.expect_uncond == step else "cond"

    def __call__(self, call: Call, step: int) -> Any:
        if call.settings is not None and call.placement == "uncond":
            _needs_cfg(call)
            if call.role == "uncond":  # u_p; the cond call runs stock
                self.expect_uncond = None
                with call.branch.live(call.modes[0], call.settings.layer):
                    return call.forward(*call.args, **call.kwargs)
            self.expect_uncond = step
            return call.forward(*call.args, **call.kwargs)
        if call.role == "uncond":
            self.expect_uncond = None
            # The stash as in the cond call (references only, dropped on return): a compiled model runs one graph
            # for both calls instead of a third one.
            with call.branch.idle(call.settings.layer if call.settings is not None else call.idle_layer, halve=False):
                out = call.forward(*call.args, **call.kwargs)
            return self._uncond(call, out, step)
        # Cleared first and set only once the cond call has returned: an exception (or Ctrl-C) inside it must not
        # leave the next run's cond call taken for an uncond call.
        self.expect_uncond, self.pending = None, None
        if call.settings is None:
            with call.branch.idle(call.idle_layer, halve=False):
                out = call.forward(*call.args, **call.kwargs)
        else:
            with _branch_context(call, self.deltas, halve=False):
                out = self._cond(call, step)
        self.expect_uncond = step if call.cfg_scale is not None else None
        return out

    def _cond(self, call: Call, step: int) -> Any:
        out = call.forward(*call.args, **call.kwargs)
        s, c = call.settings, prediction(out)
        ps = self.deltas.predictions(call, c, call.args, call.kwargs)
        g = call.cfg_scale
        if g is None:
            f = combine(c, perturbed_arg(ps), None, stg_scale=stg_scale_arg(s.scales), rescale=s.rescale,
                        orthogonalize=call.orthogonalize)
            return with_prediction(out, f)
        # Near g = 1 and with rescale, see separate_fold.py (the fold that keeps the pipeline's rounding bounded).
        c_folded, adjust_uncond = cond_return(c, perturbed_arg(ps), float(g), stg_scale_arg(s.scales), s.rescale,
                                              call.orthogonalize)
        if adjust_uncond:
            self.pending = dict(step=step, c=c, ps=ps, c_folded=c_folded, g=g, settings=s)
        return with_prediction(out, c_folded)

    def _uncond(self, call: Call, out: Any, step: int) -> Any:
        p, self.pending = self.pending, None
        if p is None or p["step"] != step:
            return out
        s, g = p["settings"], p["g"]
        u = prediction(out)
        # The pipeline computes u' + g (c' - u'); pick u' so that this is f.
        return with_prediction(out, uncond_fold(p["c"], perturbed_arg(p["ps"]), u, p["c_folded"], g,
                                                stg_scale_arg(s.scales), s.rescale, call.orthogonalize))
