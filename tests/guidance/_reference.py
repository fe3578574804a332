"""An independent reference of STG sampling on a stock pipeline (STG_SPEC sections 2 and 4).

The pipeline's own loop drives (its latents, scheduler, embeddings and post-processing), but every guidance
value is computed here, without stg_ext: at each step the reference computes

    u, c  with the stock denoiser,
    p     with a deep copy of the denoiser perturbed by the plain per-family references of tests/weak/models,
    f     = u + g (c - u) + s (c - p)     (or c + s (c - p) with CFG off; factorized: one term per mode),
          rescaled per sample by r std(c)/std(f) + 1 - r,
          then the pipeline's own guidance_rescale, if any, against c,

in float64, and makes the pipeline's CFG line produce exactly f: a batched call returns [f; f] (so
`u' + g (c' - u') = f + g * 0`), and separate calls return f from both the cond and the uncond call (the cond
call computes u itself by calling the stock model with the negative conditioning).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn


@dataclass
class Guidance:
    """What the reference computes (plain values, one per step where sequences are allowed)."""

    layer: int
    modes: Sequence[str]
    scales: Sequence[float]
    rescale: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    orthogonalize: bool = False
    guidance_rescale: float = 0.0  # the pipeline's own
    # Per-step values (one per step), in place of layer / scales / rescale when given.
    step_layers: Optional[Sequence[int]] = None
    step_scales: Optional[Sequence[Sequence[float]]] = None
    step_rescales: Optional[Sequence[float]] = None

    def at(self, step: int) -> "Guidance":
        """The plain values of one step."""
        return replace(
            self, step_layers=None, step_scales=None, step_rescales=None,
            layer=self.layer if self.step_layers is None else self.step_layers[step],
            scales=self.scales if self.step_scales is None else self.step_scales[step],
            rescale=self.rescale if self.step_rescales is None else self.step_rescales[step])

    def layers(self) -> List[int]:
        return [self.layer] if self.step_layers is None else sorted(set(self.step_layers))


def _pred(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def _with(out, new):
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, (tuple, list)):
        return (new, *out[1:])
    out.sample = new
    return out


SHARED = ("image_rotary_emb", "rotary_emb")  # per-position tables, not per-sample inputs (whatever their length)


def _second_half(value, batch: int):
    """The cond samples of a batched [uncond, cond] call: every tensor with `batch` rows, halved (rotary tables
    passed as SHARED keyword arguments are left whole)."""
    if isinstance(value, torch.Tensor):
        return value[batch // 2:] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _second_half(v, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_second_half(v, batch) for v in value)
    return value


def _std(x: torch.Tensor) -> torch.Tensor:
    dims = list(range(1, x.dim()))
    return x.std(dim=dims, keepdim=True, unbiased=False)


def formula(u: Optional[torch.Tensor], c: torch.Tensor, ps: List[torch.Tensor], g, gd: Guidance) -> torch.Tensor:
    u = None if u is None else u.double()
    c = c.double()
    ds = [c - p.double() for p in ps]
    if gd.orthogonalize:
        d_s, d_t = ds
        dims = list(range(1, c.dim()))
        dot = (d_t * d_s).sum(dims, keepdim=True)
        nrm = (d_s * d_s).sum(dims, keepdim=True)
        d_t = d_t - torch.where(nrm > 0, dot / torch.where(nrm > 0, nrm, 1), 0) * d_s
        ds = [d_s, d_t]
    f = c if u is None else u + (g.double() if isinstance(g, torch.Tensor) else g) * (c - u)
    for s, d in zip(gd.scales, ds):
        f = f + s * d
    if gd.rescale:
        sf = _std(f)
        k = torch.where(sf > 0, _std(c) / torch.where(sf > 0, sf, 1), 1)
        f = f * (gd.rescale * k + 1 - gd.rescale)
    if gd.guidance_rescale and u is not None:
        # diffusers' rescale_noise_cfg(noise_cfg=f, noise_pred_text=c, guidance_rescale)
        f_resc = f * (_std(c) / _std(f))
        f = gd.guidance_rescale * f_resc + (1 - gd.guidance_rescale) * f
    return f


class ReferenceSampler:
    """Installs the reference on `model` (instance-level forward override; `remove()` takes it off).

    convention: "batched" ([uncond, cond] in one call; [cond] with CFG off) or "separate" (cond call, then
    uncond call). cfg_scale(step) -> g or None (CFG off). negative(kwargs) -> the cond call's kwargs with the
    negative conditioning (separate convention only). perturb(model_copy, mode, layer) patches a copy.
    counter: a one-element list shared by the samplers of several denoisers that take turns in one loop (Wan 2.2's
    experts), so that steps are counted over all their calls.
    """

    def __init__(self, model: nn.Module, gd: Guidance, n_steps: int, convention: str,
                 cfg_scale: Callable[[int], Any], perturb: Callable[[nn.Module, str, int], None],
                 negative: Optional[Callable[[dict], dict]] = None, counter: Optional[List[int]] = None):
        self.model, self.gd, self.n_steps = model, gd, n_steps
        self.convention, self.cfg_scale, self.negative = convention, cfg_scale, negative
        self.weak = {}
        for mode in gd.modes:
            for layer in gd.layers():
                weak = copy.deepcopy(model)
                perturb(weak, mode, layer)
                self.weak[(mode, layer)] = weak
        self.counter = [0] if counter is None else counter
        self.pending = None
        self.stock_forward = model.forward
        model.forward = self._forward

    def remove(self) -> None:
        del self.model.forward

    def _active(self, step: int) -> bool:
        return self.gd.start * self.n_steps <= step < self.gd.stop * self.n_steps

    def _forward(self, *args, **kwargs):
        g_probe = self.cfg_scale(0)
        per_step = 2 if (self.convention == "separate" and g_probe is not None) else 1
        call = self.counter[0]
        self.counter[0] += 1
        step = call // per_step
        g = self.cfg_scale(step)
        gd = self.gd.at(step)
        out = self.stock_forward(*args, **kwargs)
        if not self._active(step):
            return out
        if self.convention == "separate" and call % per_step == 1:
            return _with(out, self.pending.to(_pred(out).dtype))  # the uncond call: f again
        pred = _pred(out)
        if self.convention == "batched" and g is not None:
            # The perturbed branch runs on the cond samples alone: on batch 2B the model's fp32 arithmetic differs
            # from batch B by an ulp, which EDM samplers (SVD: sigma up to ~700) amplify past the tolerance.
            b = pred.shape[0] // 2
            args = _second_half(args, 2 * b)
            kwargs = {k: v if k in SHARED else _second_half(v, 2 * b) for k, v in kwargs.items()}
        ps = [_pred(self.weak[(mode, gd.layer)](*args, **kwargs)) for mode in gd.modes]
        if self.convention == "batched":
            if g is None:
                return _with(out, formula(None, pred, ps, None, gd).to(pred.dtype))
            f = formula(pred[:b], pred[b:], ps, g, gd).to(pred.dtype)
            return _with(out, torch.cat([f, f]))
        if g is None:
            return _with(out, formula(None, pred, ps, None, gd).to(pred.dtype))
        u = _pred(self.stock_forward(*args, **self.negative(kwargs)))
        f = formula(u, pred, ps, g, gd).to(pred.dtype)
        self.pending = f
        return _with(out, f)


def tiny_wan_call():
    """The tiny Wan denoiser of the weak-model tests (seed 0) and one call's inputs: latents, negative and positive
    text embeddings (seed 3)."""
    from tests.weak.models import test_wan

    torch.manual_seed(0)
    model = test_wan.TestWanT2V.case.build()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 3, 8, 8, generator=gen)
    neg, pos = torch.randn(2, 1, 8, 32, generator=gen)
    return model, x, neg, pos
