"""First Block Cache: the first block's residual decides whether the other blocks run or their stored residual is
added; its state is kept per cache context (`cond`, `uncond`, `cond_uncond`).

STG's perturbed passes bypass it: p is computed by every block of the weak model, also on steps where FBC reuses
the stored residual for c (and STG-R may skip FBC's first or last block: the skip only happens in the perturbed
pass, where FBC does not run)."""
from .base import CacheKind

KIND = CacheKind(
    name="First Block Cache",
    config="FirstBlockCacheConfig",
    hooks=("fbc_leader_block_hook", "fbc_block_hook"),
    definition="u and c as FBC computes them without STG (cached steps add the stored residual); p by the "
               "uncached weak model, every block computed, on every step of the window (FBC bypassed in the "
               "perturbed pass, so STG-R may skip FBC's first or last block)",
)
