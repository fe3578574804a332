"""FasterCache: a denoiser-level CFG cache (on some steps only the cond half of `[uncond, cond]` is computed and u
is estimated from c and a stored frequency-domain delta) and attention-level extrapolation on those steps.

STG's guidance hook runs outside FasterCache's denoiser hook, whichever was installed first (the session moves its
hook outermost when it is applied and when a run starts): STG then sees FasterCache's `[u~, c]` as the stock
prediction, and FasterCache's delta is taken between the stock u and c, as without STG. The perturbed passes
bypass both hooks (their state counts calls and assumes `[uncond, cond]` batches)."""
from typing import Any, Optional

from .base import CacheKind


def _refuse(config: Any) -> Optional[str]:
    if config.placement == "uncond":
        return ("placement='uncond' perturbs the uncond rows of each [uncond, cond] call, and FasterCache's CFG cache "
                "computes no uncond rows on its skipped steps (it estimates u from c); use placement='cond'")
    return None


KIND = CacheKind(
    name="FasterCache",
    config="FasterCacheConfig",
    hooks=("faster_cache_denoiser", "faster_cache_block"),
    definition="f = u~ + g (c~ - u~) + s (c~ - p): u~, c~ as FasterCache computes them without STG (on its "
               "skipped steps u~ is its estimate from c~); p by the uncached weak model on the cond inputs "
               "(FasterCache bypassed in the perturbed pass); placement='uncond' refused",
    refuse=_refuse,
)
