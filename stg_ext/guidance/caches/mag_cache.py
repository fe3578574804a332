"""MagCache: like First Block Cache, a leader block decides (from calibrated magnitude ratios) whether the block stack
runs or a stored residual is added; state per cache context, step counted by the tail block."""
from .base import CacheKind

KIND = CacheKind(
    name="MagCache",
    config="MagCacheConfig",
    hooks=("mag_cache_leader_block_hook", "mag_cache_block_hook"),
    definition="u and c as MagCache computes them without STG; p by the uncached weak model, every block computed "
               "(MagCache bypassed in the perturbed pass: its step count sees the stock calls only)",
)
