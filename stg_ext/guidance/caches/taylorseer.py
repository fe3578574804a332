"""TaylorSeer: chosen modules (blocks, or the output projection in lite mode) return a Taylor extrapolation of their
earlier outputs on most calls; each hook counts its calls per cache context."""
from .base import CacheKind

KIND = CacheKind(
    name="TaylorSeer",
    config="TaylorSeerCacheConfig",
    hooks=("taylorseer_cache",),
    definition="u and c as TaylorSeer computes them without STG (its call count sees the stock calls only); p by "
               "the uncached weak model (TaylorSeer bypassed in the perturbed pass)",
)
