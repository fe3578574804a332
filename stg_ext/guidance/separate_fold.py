"""Folding STG's rescaled `f` into a pipeline that calls its denoiser separately for cond and uncond.

The pipeline computes `u_ret + g (c_ret - u_ret)` from what the cond call and then the uncond call return. With
STG's rescale, `f` depends on `u` (through `std(f)`), which is unknown when the cond call returns. So the cond call
returns `c_ret` and the uncond call `u_ret = (f - g c_ret) / (1 - g)`; then the pipeline's line gives `f` for
every `g != 1`.

Why `c_ret = f1 / g`, with `f1` the STG prediction at g = 1 (`c + s (c - p)`, rescaled), and not the fold of the
unrescaled case `c + (s/g)(c - p)`: the pipeline's own rounding of `c_ret - u_ret` is `eps |u_ret|`, so `u_ret`
must stay of the size of the predictions. With `c + (s/g)(c - p)`, `f - g c_ret` is the rescale's correction,
which does not vanish as g -> 1, and `|u_ret|` grows as `1/|1 - g|` (a 6% error at g = 1 + 1e-6 in fp32). With
`f1 / g`, `f - g c_ret = (f - f1) + g (f1/g - c_ret)`: the first term is O(|1 - g| |u - c|), the second the
rounding of `c_ret` (`eps |f1|`). So `|u_ret| <= K |u - c| + eps |f1| / |1 - g|`, and for `|1 - g| < eps` (the
dtype's machine epsilon) the cond call returns `f1` itself and the uncond call runs stock: the pipeline then
computes `f1 + (g - 1)(f1 - u)`, off by `|g - 1| |f1 - u| <= eps |f1 - u|`.

Error bound (tests/guidance/test_fold_near_one.py, against a float64 reference, g = 1 +- 1e-3, 1 +- 1e-6 and far
from 1, fp32 and bf16): `max |f_pipeline - f| <= 8 eps (1 + |g|) M`, `M = max(|u|, |c|, |p|, |f|)`, eps the
machine epsilon of the pipeline's dtype.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from ..ops import combine


def near_one(g: float, dtype: torch.dtype) -> bool:
    """`g` is within the dtype's machine epsilon of 1: the pipeline's line cannot tell `u` apart from 0 there."""
    return abs(1.0 - g) < torch.finfo(dtype).eps


def cond_return(c: torch.Tensor, ps: Any, g: float, stg_scale: Any, rescale: float,
                orthogonalize: bool) -> Tuple[torch.Tensor, bool]:
    """What the cond call returns, and whether the uncond call must adjust its `u` (rescale on, g not ~1)."""
    if rescale == 0.0:
        # u + g (c' - u) = u + g (c - u) + s (c - p) for every u: c' = c + (s/g)(c - p), u untouched.
        scales = [w / g for w in (stg_scale if isinstance(stg_scale, tuple) else (stg_scale,))]
        folded = combine(c, ps, None, stg_scale=scales[0] if len(scales) == 1 else tuple(scales),
                         orthogonalize=orthogonalize)
        return folded, False
    f1 = combine(c, ps, None, stg_scale=stg_scale, rescale=rescale, orthogonalize=orthogonalize)
    if g == 1.0 or near_one(g, c.dtype):
        return f1, False
    return (f1.to(_compute(c.dtype)) / g).to(c.dtype), True


def uncond_return(f: torch.Tensor, c_returned: torch.Tensor, g: float, dtype: torch.dtype) -> torch.Tensor:
    """`u_ret = (f - g c_ret) / (1 - g)`, in fp32 (fp64 for fp64 pipelines), in the pipeline's dtype."""
    compute = _compute(dtype)
    return ((f.to(compute) - g * c_returned.to(compute)) / (1.0 - g)).to(dtype)


def uncond_fold(c: torch.Tensor, ps: Any, u: torch.Tensor, c_returned: torch.Tensor, g: Any, stg_scale: Any,
                rescale: float, orthogonalize: bool) -> torch.Tensor:
    """The uncond call's return: f = combine(c, ps, u) is the guided prediction, and the pipeline computes
    u' + g (c_returned - u'), so u' = uncond_return(f, c_returned)."""
    f = combine(c, ps, u, cfg_scale=g, stg_scale=stg_scale, rescale=rescale, orthogonalize=orthogonalize)
    return uncond_return(f, c_returned, float(g), u.dtype)


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
