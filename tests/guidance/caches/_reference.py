"""STG alongside a diffusers cache, written out plainly (the definition of stg_ext/guidance/caches/__init__.py):

    u~, c~  the cached stock model's predictions (the cache's own hooks, seeing the pipeline's calls only),
    p       an uncached deep copy of the denoiser, taken before the cache was enabled, perturbed by the plain
            per-family references of tests/weak/models, on the cond inputs,
    f       = u~ + g (c~ - u~) + s (c~ - p)   in float64,

and the pipeline's CFG line is made to give f without folding anything into c~: a batched call returns [f; f], and
separate calls return c~ from the cond call and u' = (f - g c~) / (1 - g) from the uncond call (u' + g (c~ - u') = f).
The cache's hooks sit inside the stock forward this reference calls, so they see exactly the stock calls.
"""
from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from tests.guidance._reference import SHARED, _pred, _second_half, _with
from tests.weak.models import (test_allegro, test_cogvideox, test_cosmos, test_easyanimate, test_hunyuan_video,
                               test_hunyuan_video15, test_latte, test_ltx, test_mochi, test_wan)


@dataclass
class Family:
    name: str
    tests: type                   # the tests/weak/models class whose plain references perturb the denoiser
    convention: str               # "batched" ([uncond, cond] in one call) or "separate" (cond call, uncond call)
    cfg_key: Optional[str] = "guidance_scale"  # None: the pipeline's guider holds the CFG scale
    layer: int = 1
    tensor_format: str = "BCFHW"  # FasterCache's name for the latents' layout
    cfg_offset: float = 0.0       # g = the pipeline's scale + this (Cosmos writes CFG as c + w (c - u): g = 1 + w)


FAMILIES: Dict[str, Family] = {f.name: f for f in [
    Family("mochi", test_mochi.TestMochi, "batched"),
    Family("ltx", test_ltx.TestLTXVideo, "batched"),
    Family("cogvideox", test_cogvideox.TestCogVideoX5B, "batched", tensor_format="BFCHW"),
    Family("latte", test_latte.TestLatte, "batched"),
    Family("allegro", test_allegro.TestAllegroRoPE, "batched"),
    Family("wan", test_wan.TestWanT2V, "separate"),
    Family("hunyuan_video", test_hunyuan_video.TestHunyuanVideo, "separate", cfg_key="true_cfg_scale", layer=2),
    Family("easyanimate", test_easyanimate.TestEasyAnimate, "batched"),
    # Its guider (ClassifierFreeGuidance) calls the denoiser for pred_cond, then pred_uncond.
    Family("hunyuan_video15", test_hunyuan_video15.TestHunyuanVideo15, "separate", cfg_key=None),
    # Separate calls, cond first, no cache_context.
    Family("cosmos", test_cosmos.TestCosmosLearnablePosEmb, "separate", cfg_offset=1.0),
]}


def perturbation(fam: Family, mode: str) -> Callable[[nn.Module, int], None]:
    """The plain reference patch of `mode` for the family (factorized families' modules keep theirs in REFERENCES)."""
    case = fam.tests.case
    refs = getattr(sys.modules[fam.tests.__module__], "REFERENCES", None) or {
        "residual": case.reference_residual, "attention": case.reference_attention}
    return refs[mode]





class CachedReference:
    """Installed on `model` (an instance-level forward over the cached forward); `remove()` takes it off.
    `weak` is the perturbed uncached copy; `g` the CFG scale (a float), `s` the STG scale."""

    def __init__(self, model: nn.Module, weak: nn.Module, convention: str, g: float, s: float):
        self.model, self.weak, self.convention, self.g, self.s = model, weak, convention, g, s
        self.stock = model.forward
        self.had_forward = "forward" in model.__dict__  # the hook registry's (a cache hook on the model itself)
        self.calls = 0
        self.pending: Optional[tuple] = None
        model.forward = self._forward

    def remove(self) -> None:
        if self.had_forward:
            self.model.forward = self.stock
        else:
            del self.model.forward

    def _f(self, u, c, p):
        u, c, p = u.double(), c.double(), p.double()
        return u + self.g * (c - u) + self.s * (c - p)

    def _forward(self, *args, **kwargs):
        out = self.stock(*args, **kwargs)
        pred = _pred(out)
        if self.convention == "batched":
            b = pred.shape[0] // 2
            cargs = _second_half(args, 2 * b)
            ckwargs = {k: v if k in SHARED else _second_half(v, 2 * b) for k, v in kwargs.items()}
            p = _pred(self.weak(*cargs, **ckwargs))
            f = self._f(pred[:b], pred[b:], p).to(pred.dtype)
            return _with(out, torch.cat([f, f]))
        self.calls += 1
        if self.calls % 2 == 1:  # the cond call (every separate-call loop calls cond first)
            self.pending = (pred, _pred(self.weak(*args, **kwargs)))
            return out
        c, p = self.pending
        f = self._f(pred, c, p)
        return _with(out, ((f - self.g * c.double()) / (1 - self.g)).to(pred.dtype))


@dataclass
class Pipeline:
    """A tiny pipeline and what a cache test needs: its denoiser, and a deep copy of it taken before any cache."""

    tp: Any
    fam: Family
    model: nn.Module = field(init=False)
    plain: nn.Module = field(init=False)

    def __post_init__(self):
        self.model = getattr(self.tp.pipe, self.tp.denoiser_attrs[0])
        self.plain = copy.deepcopy(self.model)

    def run(self, steps: int, **overrides) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.tp.pipe(**self.tp.call_kwargs(steps=steps, **overrides)).frames

    def reference(self, mode: str, steps: int, s: float = 1.0, layer: Optional[int] = None) -> torch.Tensor:
        """f of the definition above, sampled by the pipeline's own loop (the cache must be enabled already)."""
        weak = copy.deepcopy(self.plain)
        perturbation(self.fam, mode)(weak, self.fam.layer if layer is None else layer)
        key = self.fam.cfg_key
        g = float(self.tp.pipe.guider.guidance_scale if key is None else self.tp.call_kwargs(steps=steps)[key])
        g += self.fam.cfg_offset
        ref = CachedReference(self.model, weak, self.fam.convention, g, s)
        try:
            return self.run(steps)
        finally:
            ref.remove()


def check(out: torch.Tensor, ref: torch.Tensor, stock: torch.Tensor, tol: float = 1e-4) -> None:
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} x {scale:.3g}"
    assert not torch.equal(out, stock), "STG changed nothing"
