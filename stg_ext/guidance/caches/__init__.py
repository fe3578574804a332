"""STG alongside diffusers' caches (`transformer.enable_cache(...)`, `apply_*_cache`), in either order.

One rule for every cache: the cache approximates the stock passes (u, c) exactly as it does without STG, and STG's
perturbed passes run with every cache hook bypassed, so p is the uncached weak model's prediction (its state never
sees a perturbed pass, and a perturbed pass never gets a stored activation of another pass). One module per cache
says which hooks are its own, whether it changes values (then prefix reuse steps aside: the cond pass's activations
at the perturbed block are the cache's approximations, not the uncached model's) and what it refuses.

`bypassed(model)` is the perturbed passes' context; `arrange(model, name)` keeps STG's guidance hook outside the
caches' denoiser-level hooks (FasterCache's CFG cache splits the batch there); `refusals(model, config)` are the
combinations without meaning. The session calls `arrange` and `refusals` when STG is applied, when a run starts and
at each run's first call, so installing a cache after apply_stg is seen before (or at) its first use.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Tuple

from diffusers.hooks import HookRegistry
from torch import nn

from ...weak.hooks import move_outermost
from . import faster_cache, first_block_cache, mag_cache, pyramid_attention_broadcast, sea_cache, taylorseer
from . import text_kv_cache
from .base import CacheKind

__all__ = ["CacheKind", "KINDS", "CacheScan", "present", "approximating", "bypassed", "outside", "arrange",
           "refusals"]

KINDS: Tuple[CacheKind, ...] = tuple(m.KIND for m in (pyramid_attention_broadcast, faster_cache, first_block_cache,
                                                     mag_cache, sea_cache, taylorseer, text_kv_cache))
_KIND_OF = {hook: kind for kind in KINDS for hook in kind.hooks}


def _registries(model: nn.Module) -> Iterator[HookRegistry]:
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            yield registry


def _pass_through_pre(module: nn.Module, *args, **kwargs):
    return args, kwargs


def _pass_through_post(module: nn.Module, output: Any) -> Any:
    return output


class CacheScan:
    """What one walk over `model`'s modules found: the hook registries (any hooks: a cache added later to a module
    that already had a hook is still seen) and the caches they hold. A walk over every module costs milliseconds of
    Python for a large denoiser (Mochi's 2410 modules: 9-13 ms here for the two walks each STG call made), so a
    guidance session scans where it checks the caches (when STG is applied, when a run starts and at each run's
    first call) and its calls use that scan."""

    def __init__(self, model: nn.Module):
        self.registries: Tuple[HookRegistry, ...] = tuple(_registries(model))

    @property
    def kinds(self) -> List[CacheKind]:
        """The caches with a hook in the scanned registries now, in KINDS order."""
        found = {_KIND_OF[name] for registry in self.registries for name in registry.hooks if name in _KIND_OF}
        return [kind for kind in KINDS if kind in found]

    @property
    def approximating(self) -> bool:
        """Whether a cache that replaces activations by approximations is among them."""
        return any(not kind.exact for kind in self.kinds)

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """`bypassed(model)` over the scanned registries."""
        saved = []
        for registry in self.registries:
            for index, name in enumerate(registry._hook_order):
                if name not in _KIND_OF:
                    continue
                ref = registry._fn_refs[index]
                saved.append((ref, ref.pre_forward, ref.forward, ref.post_forward))
                ref.pre_forward, ref.post_forward = _pass_through_pre, _pass_through_post
                if ref.original_forward is not None:  # a hook with its own forward: call what it wraps instead
                    ref.forward = ref.original_forward
        try:
            yield
        finally:
            for ref, pre, forward, post in reversed(saved):
                ref.pre_forward, ref.forward, ref.post_forward = pre, forward, post


def present(model: nn.Module) -> List[CacheKind]:
    """The caches with a hook anywhere in `model` (itself included), in KINDS order."""
    return CacheScan(model).kinds


def approximating(model: nn.Module) -> bool:
    """Whether a cache that replaces activations by approximations is on `model`."""
    return CacheScan(model).approximating


def bypassed(model: nn.Module):
    """A context inside which every cache hook in `model` passes its call straight to what it wraps: its pre/post
    callbacks and its own forward are out of the chain (diffusers' HookFunctionReference is mutable for this), and
    its state is neither read nor written. Other hooks (STG's, offloading, context parallelism) stay."""
    return CacheScan(model).bypassed()


def outside(model: nn.Module, name: str) -> List[str]:
    """The cache hooks on `model` itself that run outside its hook `name` (registered after it)."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return []
    order = registry._hook_order
    return [h for h in order[order.index(name) + 1:] if h in _KIND_OF]


def arrange(model: nn.Module, name: str) -> bool:
    """Moves `model`'s hook `name` outside every cache hook on `model` itself; True if it had to move. Must not be
    called while `model` is being called (the chain is rebuilt)."""
    if not outside(model, name):
        return False
    move_outermost(model, name)
    return True


def refusals(model: nn.Module, config: Any, spread: bool = False, scan: Optional[CacheScan] = None) -> List[str]:
    """Why STG with `config` has no meaning alongside the caches on `model` (empty: it has). `spread`: the session's
    branches run on several processes (process_group=), each of whose cache would see only its own rank's calls
    and approximate them differently from one process. `scan`: a scan of `model` just taken (else one is taken)."""
    out = []
    kinds = (scan if scan is not None else CacheScan(model)).kinds
    if spread and any(not kind.exact for kind in kinds):
        names = ", ".join(kind.name for kind in kinds if not kind.exact)
        out.append(f"stg_ext: process_group= spreads a step's branches over processes, and {type(model).__name__} "
                   f"carries diffusers' {names}: each rank's cache would see only its own branches' calls, so its "
                   "approximations would differ from one process's; disable the cache or drop process_group=")
    for kind in kinds:
        reason = kind.refuse(config) if kind.refuse is not None else None
        if reason is None and not kind.exact and config.placement == "uncond":
            reason = _UNCOND_PLACEMENT
        if reason is not None:
            out.append(f"stg_ext: STG and diffusers' {kind.name} ({kind.config}) on {type(model).__name__}: {reason}")
    return out


# placement="uncond" runs the perturbation inside the stock call (on its uncond rows): the cache would then see the
# perturbed rows as its stock pass, and which of its hooks and STG's runs outside the other on a shared module (the
# installation order) would decide whether a perturbed row's call reaches the cache, or a split batch does.
_UNCOND_PLACEMENT = ("placement='uncond' perturbs the uncond rows inside the stock call, which this cache "
                     "approximates; use placement='cond' (the perturbed pass bypasses the cache)")
