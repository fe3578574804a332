"""SeaCache: a root hook on the denoiser gates each call (spectral indicators between steps) and the block stack is
replaced by a predicted residual on gated calls; state per cache context."""
from .base import CacheKind

KIND = CacheKind(
    name="SeaCache",
    config="SeaCacheConfig",
    hooks=("sea_cache_root", "sea_cache_leader_block", "sea_cache_block", "sea_cache_post_norm"),
    definition="u and c as SeaCache computes them without STG (its root hook runs inside STG's); p by the uncached "
               "weak model (SeaCache bypassed in the perturbed pass)",
)
