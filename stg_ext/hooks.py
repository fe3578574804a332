"""The weak model's hooks: removable, named diffusers ModelHooks on the perturbed blocks / attention modules.

Each hook consults a shared `PerturbationState`: when inactive, the module runs its own forward untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Tuple

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from .adapters.base import AttentionTarget, ModelAdapter, read_signature
from .identity_attention import IdentityAttentionMode

SKIP_HOOK = "stg_ext.skip_block"
IDENTITY_HOOK = "stg_ext.identity_attention"


@dataclass
class PerturbationState:
    """Shared by the hooks of one installation: whether the perturbation is live, and whether STG-A may take
    the value-only fast path (else the exact SDPA interception everywhere)."""

    active: bool = True
    value_only: bool = True


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
        return self.adapter.skip_output(module, args, kwargs)


class IdentityAttentionHook(ModelHook):
    """STG-A: the module's self-attention map is the identity (value-only path, or SDPA interception)."""

    def __init__(self, target: AttentionTarget, state: PerturbationState):
        super().__init__()
        self.target = target
        self.state = state

    def new_forward(self, module: nn.Module, *args, **kwargs) -> Any:
        if not self.state.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.state.value_only and self.target.value_only is not None:
            return self.target.value_only(module, *args, **kwargs)
        return self._intercepted(module, args, kwargs)

    # A TorchFunctionMode cannot be traced by torch.compile: this part runs eagerly (a clean graph break).
    @torch.compiler.disable
    def _intercepted(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        n_video = None
        if self.target.joint is not None:
            # Every attention module's forward takes hidden_states first.
            n_video = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[1]
        mode = IdentityAttentionMode(self.target.joint, n_video)
        with mode:
            out = self.fn_ref.original_forward(*args, **kwargs)
        if mode.intercepted == 0:
            raise RuntimeError(
                f"stg_ext: STG-A on {self.target.path} found no scaled_dot_product_attention call to make the "
                f"identity ({type(getattr(module, 'processor', module)).__name__} does not use torch's SDPA, e.g. "
                "a non-native attention backend); use the native backend or value_only=True")
        return out


def install(module: nn.Module, hook: ModelHook, name: str) -> Tuple[nn.Module, str]:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    return module, name


def uninstall(installed: List[Tuple[nn.Module, str]]) -> None:
    """Removes hooks in reverse order of installation (diffusers' remove_hook mis-links a hook removed
    before one registered after it on the same module), then drops what the registry left behind."""
    for module, name in reversed(installed):
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        registry.remove_hook(name, recurse=False)
        if not registry.hooks:
            # The registry re-assigned `forward` as an instance attribute; with no hooks left it is the
            # class's own forward again, so drop the attribute and the empty registry.
            module.__dict__.pop("forward", None)
            del module._diffusers_hook
