"""The weak model's hooks: removable, named diffusers ModelHooks on the perturbed blocks / attention modules.

Each hook consults a shared `PerturbationState`: when inactive, the module runs its own forward untouched.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from .adapters.base import AttentionTarget, ModelAdapter, argument, read_signature
from .batch import cat_rows, take_rows
from .identity_attention import IdentityAttentionMode, IdentityProcessor

SKIP_HOOK = "stg_ext.skip_block"
IDENTITY_HOOK = "stg_ext.identity_attention"


@dataclass
class PerturbationState:
    """Shared by the hooks of one installation: whether the perturbation is live, and whether STG-A may take
    the value-only fast path (else the exact SDPA interception everywhere)."""

    active: bool = True
    value_only: bool = True
    # Joined batches (strategy="batched"): only these rows of each call are the perturbed samples; the others
    # run the stock forward. None: the whole call is perturbed.
    rows: Optional[slice] = None


class SkipBlockHook(ModelHook):
    """STG-R: the block returns its inputs (every stream it carries, in its own return order)."""

    def __init__(self, adapter: ModelAdapter, state: PerturbationState):
        super().__init__()
        self.adapter = adapter
        self.state = state

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        read_signature(module)  # now, not while torch.compile traces the skipped call
        return module

    def new_forward(self, module: nn.Module, *args, **kwargs) -> Any:
        if not self.state.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.state.rows is not None:
            return split_call(module, self.adapter.shared_inputs, args, kwargs, self.state.rows,
                              self.fn_ref.original_forward,
                              lambda a, k: self.adapter.skip_output(module, a, k))
        return self.adapter.skip_output(module, args, kwargs)


class IdentityAttentionHook(ModelHook):
    """STG-A: the module's self-attention map is the identity (value-only path, or SDPA interception)."""

    def __init__(self, target: AttentionTarget, state: PerturbationState,
                 shared: Tuple[str, ...] = ModelAdapter.shared_inputs):
        super().__init__()
        self.target = target
        self.state = state
        self.shared = shared  # the model's per-call (not per-sample) arguments, for joined batches
        self.twin: Optional[IdentityProcessor] = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._twin(module)  # now, not while torch.compile traces a call
        return module

    def deinitalize_hook(self, module: nn.Module) -> nn.Module:  # (sic: diffusers' name)
        if self.twin is not None:
            self.twin.release()
            self.twin = None
        return module

    def _twin(self, module: nn.Module) -> Optional[IdentityProcessor]:
        processor = getattr(module, "processor", None)
        if self.twin is None or self.twin.processor is not processor:
            if self.twin is not None:
                self.twin.release()
            self.twin = IdentityProcessor(processor, self.target.joint) if IdentityProcessor.applies_to(processor) else None
        return self.twin

    def new_forward(self, module: nn.Module, *args, **kwargs) -> Any:
        if not self.state.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.state.rows is not None:
            return split_call(module, self.shared, args, kwargs, self.state.rows,
                              self.fn_ref.original_forward,
                              lambda a, k: self._identity(module, a, k))
        return self._identity(module, args, kwargs)

    def _identity(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.state.value_only and self.target.value_only is not None:
            return self.target.value_only(module, *args, **kwargs)
        return self._intercepted(module, args, kwargs)

    def _intercepted(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        twin = self._twin(module)
        if twin is not None:
            out = twin(module, *args, **kwargs)
            if twin.calls == 0:
                self._found_none(module)
            return out
        return self._intercepted_by_mode(module, args, kwargs)

    def _found_none(self, module: nn.Module) -> None:
        raise RuntimeError(
            f"stg_ext: STG-A on {self.target.path} found no scaled_dot_product_attention call to make the "
            f"identity ({type(getattr(module, 'processor', module)).__name__} does not use torch's SDPA, e.g. "
            "a non-native attention backend); use the native backend or value_only=True")

    # The TorchFunctionMode is not traced by torch.compile: this part runs eagerly (only for modules without an
    # attention processor of the usual form).
    @torch.compiler.disable
    def _intercepted_by_mode(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        n_video = None
        if self.target.joint is not None:
            # Every attention module's forward takes hidden_states first.
            n_video = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[1]
        mode = IdentityAttentionMode(self.target.joint, n_video)
        with mode:
            out = self.fn_ref.original_forward(*args, **kwargs)
        if mode.intercepted == 0:
            self._found_none(module)
        return out


def split_call(module: nn.Module, shared: Tuple[str, ...], args: tuple, kwargs: dict, rows: slice,
               stock, perturbed) -> Any:
    """A call on a batch of which `rows` (the leading or the trailing rows) run `perturbed` and the others `stock`;
    the outputs are joined again in the module's own return structure."""
    n = argument(module, args, kwargs, "hidden_states").shape[0]
    start, stop = rows.start or 0, n if rows.stop is None else rows.stop
    if start == 0:  # placement="uncond": the uncond rows lead
        lead = take_rows(module, shared, args, kwargs, n, slice(0, stop))
        rest = take_rows(module, shared, args, kwargs, n, slice(stop, n))
        return cat_rows(perturbed(*lead), stock(*rest[0], **rest[1]))
    head = take_rows(module, shared, args, kwargs, n, slice(0, start))
    tail = take_rows(module, shared, args, kwargs, n, slice(start, stop))
    return cat_rows(stock(*head[0], **head[1]), perturbed(*tail))


def _accelerate_wrapped(module: nn.Module) -> bool:
    """accelerate's add_hook_to_module keeps the wrapped forward in `module._old_forward` and puts its wrapper
    in `module.__dict__['forward']`; a pipeline's model offload re-installs it after every call."""
    return (getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__
            and "forward" in module.__dict__)


@contextmanager
def _beneath_accelerate(module: nn.Module) -> Iterator[None]:
    """Lets the hook registry work on the forward accelerate wraps (so that accelerate's re-installation keeps
    our hooks), then puts accelerate's wrapper back on top."""
    if not _accelerate_wrapped(module):
        yield
        return
    wrapper = module.__dict__["forward"]
    module.forward = module._old_forward
    try:
        yield
    finally:
        module._old_forward = module.__dict__.pop("forward", None) or types.MethodType(type(module).forward, module)
        module.forward = wrapper


def install(module: nn.Module, hook: ModelHook, name: str) -> Tuple[nn.Module, str]:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    with _beneath_accelerate(module):
        registry.register_hook(hook, name)
    return module, name


def _remove_hook(registry: HookRegistry, name: str) -> None:
    """diffusers' remove_hook re-links a later hook that has `new_forward` through its `forward` (dropping it
    from the chain); re-link that hook's inner call instead."""
    index = registry._hook_order.index(name)
    if index < len(registry._hook_order) - 1:
        following = registry.hooks[registry._hook_order[index + 1]]
        if hasattr(following, "new_forward"):
            fn_ref = registry._fn_refs[index]
            inner = fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward
            registry._fn_refs[index + 1].original_forward = inner
            hook = registry.hooks.pop(name)
            registry._module_ref = hook.deinitalize_hook(registry._module_ref)
            registry._hook_order.pop(index)
            registry._fn_refs.pop(index)
            return
    registry.remove_hook(name, recurse=False)


def move_outermost(module: nn.Module, name: str) -> None:
    """Re-registers `module`'s hook `name` last, so that it runs outside the hooks registered after it (the other
    hooks keep their order and links)."""
    registry = module._diffusers_hook
    hook = registry.hooks[name]
    with _beneath_accelerate(module):
        _remove_hook(registry, name)
        registry.register_hook(hook, name)


def uninstall(installed: List[Tuple[nn.Module, str]]) -> None:
    """Removes hooks in reverse order of installation, keeping any other hooks (diffusers' caches, accelerate's
    offloading) working, then drops what the registry left behind."""
    for module, name in reversed(installed):
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or name not in registry.hooks:
            continue
        with _beneath_accelerate(module):
            _remove_hook(registry, name)
        if not registry.hooks:
            # The registry re-assigned `forward` as an instance attribute; when it is the class's own forward again,
            # drop it and the empty registry (someone else's wrapper stays).
            forward = module.__dict__.get("forward")
            if getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module:
                del module.__dict__["forward"]
            del module._diffusers_hook
