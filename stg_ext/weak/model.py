"""The weak model (STG_SPEC section 3): turn a diffusers video denoiser into its perturbed self, removably.

    with stg_ext.perturbed(transformer, layer=34, mode="residual"):
        p = transformer(**inputs)            # the perturbed prediction
    c = transformer(**inputs)                # untouched again

`stg_ext.weak_model(model, layer, mode)` installs the same perturbation until `.remove()` (or
`stg_ext.remove_stg(model)`). Guidance (`apply_stg`) installs it inactive and switches it on per pass.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple, Union

from torch import nn

from .adapters import get_adapter
from .adapters.base import Layer, ModelAdapter
from ..handle import Handle
from .hooks import IDENTITY_HOOK, SKIP_HOOK, IdentityAttentionHook, PerturbationState, SkipBlockHook, install, uninstall

#: An index, a module path, or a sequence of those (STG_SPEC section 3).
LayerSpec = Union[int, str, Sequence[Union[int, str]]]

_HANDLE_ATTR = "_stg_ext_weak_handle"


def unwrap(model: nn.Module) -> nn.Module:
    """The module hooks go on: torch.compile's OptimizedModule keeps the model as `_orig_mod`."""
    return getattr(model, "_orig_mod", model)


def resolve_layers(adapter: ModelAdapter, model: nn.Module, layer: LayerSpec) -> List[Layer]:
    """STG_SPEC section 3 addressing: 0-based index in execution order, negative from the end, a block's
    module path, or a sequence of those."""
    layers = adapter.layers(model)
    n = len(layers)
    specs = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not specs:
        raise ValueError("stg_ext: layer must name at least one layer")
    out: List[Layer] = []
    for spec in specs:
        if isinstance(spec, bool) or not isinstance(spec, (int, str)):
            raise TypeError(f"stg_ext: a layer is an int index or a module path string, got {type(spec).__name__}")
        if isinstance(spec, int):
            if not -n <= spec < n:
                raise IndexError(f"stg_ext: layer {spec} is out of range for {type(model).__name__}, which has {n} "
                                 f"layers: valid indices are 0..{n - 1} (or -{n}..-1)")
            chosen = layers[spec]
        else:
            matches = [lay for lay in layers if spec in lay.paths]
            if not matches:
                examples = ", ".join(repr(lay.paths[0]) for lay in layers[:3])
                raise ValueError(f"stg_ext: {spec!r} is not a layer of {type(model).__name__}; layers are "
                                 f"addressed by index 0..{n - 1} or module path ({examples}, ...)")
            chosen = matches[0]
        if all(chosen.index != lay.index for lay in out):
            out.append(chosen)
    return out


def _check_mode(adapter: ModelAdapter, model: nn.Module, mode: str) -> None:
    if mode not in adapter.modes():
        raise ValueError(f"stg_ext: mode {mode!r} is not available for {type(model).__name__}; valid modes: "
                         f"{', '.join(repr(m) for m in adapter.modes())}")


class WeakModelHandle(Handle):
    """An installed perturbation. `.remove()` restores the model exactly; usable as a context manager."""

    def __init__(self, model: nn.Module, layers: List[Layer], mode: str, state: PerturbationState,
                 installed: List[Tuple[nn.Module, str]]):
        self.model = model
        self.layers = layers
        self.mode = mode
        self.state = state
        self._installed = installed

    @property
    def layer_indices(self) -> List[int]:
        return [lay.index for lay in self.layers]

    def remove(self) -> None:
        uninstall(self._installed)
        self._installed = []
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)

    def __repr__(self) -> str:
        return f"WeakModelHandle({type(self.model).__name__}, layers={self.layer_indices}, mode={self.mode!r})"


def weak_model(model: nn.Module, layer: LayerSpec, mode: str = "attention", *,
               value_only: bool = True) -> WeakModelHandle:
    """Makes `model` the weak model until `.remove()`: `model(...)` computes the perturbed prediction p (replacing
    an earlier weak model on `model`). value_only=False forces the exact SDPA-interception path of STG-A everywhere
    (the reference of the value-only fast path)."""
    model = unwrap(model)
    adapter = get_adapter(model)
    _check_mode(adapter, model, mode)
    layers = resolve_layers(adapter, model, layer)
    remove_weak_model(model)
    state = PerturbationState(active=True, value_only=value_only)
    installed: List[Tuple[nn.Module, str]] = []
    try:
        for lay in layers:
            installed += install_layer_hooks(adapter, lay, mode, state)
    except Exception:
        uninstall(installed)
        raise
    handle = WeakModelHandle(model, layers, mode, state, installed)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def install_layer_hooks(adapter: ModelAdapter, lay: Layer, mode: str, state: PerturbationState,
                        tag: str = "", cache_boundaries: bool = True) -> List[Tuple[nn.Module, str]]:
    """The hooks that make `lay` perturbed by `mode` while `state.active`; `tag` keeps the hook names of
    several installations on one module apart (a guidance session installs one per (mode, layer)).
    `cache_boundaries`: refuse to skip First Block Cache's boundary blocks (a weak model alone runs through the
    cache; guidance bypasses the caches in its perturbed passes and passes False)."""
    installed: List[Tuple[nn.Module, str]] = []
    try:
        if mode == "residual" and cache_boundaries:
            for path, module in adapter.skip_modules(lay):
                _refuse_cache_boundary(module, path)
        if mode == "residual":
            for _, module in adapter.skip_modules(lay):
                installed.append(install(module, SkipBlockHook(adapter, state), SKIP_HOOK + tag))
        else:
            for target in adapter.attention_targets(lay, mode):
                installed.append(install(target.module, IdentityAttentionHook(target, state, adapter.shared_inputs),
                                         IDENTITY_HOOK + tag))
    except Exception:
        uninstall(installed)
        raise
    return installed


# diffusers' First Block Cache hooks its first block (which decides whether to reuse the cache) and its last block
# (which completes the cache): a skipped block never runs their hooks.
def _is_cache_boundary(hook: Any) -> bool:
    return type(hook).__name__ == "FBCHeadBlockHook" or (type(hook).__name__ == "FBCBlockHook"
                                                          and getattr(hook, "is_tail", False))


def _refuse_cache_boundary(module: nn.Module, path: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and any(_is_cache_boundary(h) for h in registry.hooks.values()):
        raise ValueError(f"stg_ext: STG-R cannot skip {path}: it is the first or last block of diffusers' First Block "
                         "Cache, which keeps its state in that block's hook. Choose another layer, use "
                         "mode='attention', or enable the cache after apply_stg")


def check_mode(model: nn.Module, mode: str) -> None:
    model = unwrap(model)
    _check_mode(get_adapter(model), model, mode)


def perturbed(model: nn.Module, layer: LayerSpec, mode: str = "attention", *,
              value_only: bool = True) -> WeakModelHandle:
    """Context manager: inside, `model(...)` computes the perturbed prediction p; outside, the stock model."""
    return weak_model(model, layer, mode, value_only=value_only)


def remove_weak_model(model: nn.Module) -> None:
    """Removes the weak model installed on `model` by `weak_model`/`perturbed` (no-op when there is none)."""
    handle = getattr(unwrap(model), _HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()
