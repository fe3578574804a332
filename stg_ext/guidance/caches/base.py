"""What stg_ext knows about one of diffusers' caches: the names its hooks carry, whether it changes values, and
what STG computes with it (the README's table is written from these)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple


@dataclass(frozen=True)
class CacheKind:
    name: str                   # as diffusers' docs call it
    config: str                 # the config class `enable_cache` takes
    hooks: Tuple[str, ...]      # the names diffusers registers its hooks under
    # False: its hooks replace activations by approximations (so the cond pass's activations at the first perturbed
    # block are not the uncached model's, and prefix reuse, which starts the perturbed branch from them, steps aside).
    exact: bool = False
    definition: str = ""        # what STG with this cache computes
    # (config) -> a reason this combination has no meaning, or None. Asked at apply_stg, when a sampling run
    # starts and at each run's first denoiser call, whichever order STG and the cache were installed in.
    refuse: Optional[Callable[[Any], Optional[str]]] = None
