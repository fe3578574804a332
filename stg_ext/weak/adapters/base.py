"""What the generic machinery needs to know about one model family (STG_SPEC section 3).

An adapter answers, for its model classes: where the transformer blocks are (in execution order), which
streams a block receives and returns (for STG-R), which self-attention module(s) STG-A makes the identity,
and, for joint attention, how video and text tokens are laid out in the attention call. Nothing outside
`stg_ext/adapters/` knows a model by name.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

MODES = ("attention", "residual")
FACTORIZED_MODES = ("attention", "residual", "spatial", "temporal")


@dataclass(frozen=True)
class JointLayout:
    """How a joint-attention processor lays out its sequence when it calls scaled_dot_product_attention.

    video_first: the joint sequence is [video; text] (else [text; video]).
    The number of video tokens is the `hidden_states` length the attention module receives; every other
    position of the SDPA sequence is text (models that drop padded text before SDPA, like Mochi, are
    covered by that, and models that mask padded text pass the mask to SDPA).
    """

    video_first: bool


@dataclass
class Layer:
    """One addressable STG layer: index in execution order, and the block module(s) it consists of.

    Most models: one transformer block. Factorized models: a (spatial, temporal) pair of blocks (Latte), or
    one module holding both (SVD's TransformerSpatioTemporalModel).
    """

    index: int
    paths: Tuple[str, ...]
    modules: Tuple[nn.Module, ...]


@dataclass
class AttentionTarget:
    """A self-attention module STG-A makes the identity, and how to do it."""

    path: str
    module: nn.Module
    joint: Optional[JointLayout] = None
    # Computes the identity-attention output straight from the module's call arguments (only V and the
    # output projection), skipping Q, K and the attention kernel. None: use the exact SDPA interception.
    value_only: Optional[Callable[..., Any]] = None


class ModelAdapter:
    """Base class: subclass per model family and register it with `stg_ext.weak.adapters.register_adapter`.

    Class attributes cover the common cases; override the methods for anything else.
    """

    #: Names of the model classes this adapter serves (names, so that optional diffusers classes need no import).
    model_classes: Tuple[str, ...] = ()
    #: Attribute paths of the block lists, in execution order.
    block_lists: Tuple[str, ...] = ("transformer_blocks",)
    #: Parameter names of the block's forward that the block returns, in its return order (STG-R returns
    #: these inputs unchanged). One name: the block returns a tensor; several: a tuple.
    block_returns: Tuple[str, ...] = ("hidden_states",)
    #: Attribute path(s) of the self-attention module(s) inside a block.
    self_attention: Tuple[str, ...] = ("attn1",)
    #: Joint attention layout, or None for video-only self-attention.
    joint: Optional[JointLayout] = None
    #: Whether "spatial"/"temporal" modes exist (factorized models).
    factorized: bool = False
    #: Whether the perturbed branch may start from the cond pass's inputs of its first perturbed block (prefix
    #: reuse, STG_SPEC section 5): true when the blocks run one after another with nothing else carrying
    #: state past them (a UNet's skip connections and resnets between its layers do).
    prefix_reuse: bool = True
    #: Whether the blocks from the first perturbed one on can run a joined batch (stock rows plus perturbed rows,
    #: strategy="batched"): true when nothing between the blocks depends on the batch size.
    joinable: bool = True
    #: Forward parameters that hold per-call data, not per-sample data (rotary tables, kwargs dicts): a
    #: guidance driver that splits a batched [uncond, cond] call keeps them whole.
    shared_inputs: Tuple[str, ...] = ("image_rotary_emb", "rotary_emb", "attention_kwargs",
                                      "joint_attention_kwargs", "cross_attention_kwargs", "rope_interpolation_scale")

    # --- layers --------------------------------------------------------------------------------------

    def layers(self, model: nn.Module) -> List[Layer]:
        out = []
        for list_path in self.block_lists:
            blocks = model.get_submodule(list_path)
            for i, block in enumerate(blocks):
                out.append(Layer(len(out), (f"{list_path}.{i}",), (block,)))
        return out

    def modes(self) -> Tuple[str, ...]:
        return FACTORIZED_MODES if self.factorized else MODES

    # --- STG-R -------------------------------------------------------------------------------------

    def skip_modules(self, layer: Layer) -> Sequence[Tuple[str, nn.Module]]:
        """The modules whose forward STG-R replaces by 'return the inputs'."""
        return list(zip(layer.paths, layer.modules))

    def skip_output(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """What a skipped block returns: its inputs named by `block_returns`, in the block's order."""
        values = tuple(argument(module, args, kwargs, name) for name in self.block_returns)
        return values[0] if len(values) == 1 else values

    # --- STG-A -------------------------------------------------------------------------------------

    def attention_targets(self, layer: Layer, mode: str) -> List[AttentionTarget]:
        """The self-attention modules that `mode` makes the identity in `layer`."""
        targets = []
        for path, block in zip(layer.paths, layer.modules):
            for name in self.self_attention:
                module = block.get_submodule(name)
                targets.append(AttentionTarget(f"{path}.{name}", module, self.joint, self.value_only_fn(module)))
        return targets

    def value_only_fn(self, attn: nn.Module) -> Optional[Callable[..., Any]]:
        """A fast identity-attention forward for `attn` (video-only self-attention), or None.

        Default: `to_out(to_v(hidden_states))` when the module has plain to_v / to_out projections and no
        fused QKV; heads are irrelevant because the identity maps each head's value to itself.
        """
        if self.joint is not None or not has_plain_value_path(attn):
            return None
        return plain_value_only


def has_plain_value_path(attn: nn.Module) -> bool:
    """True when the processor's output is exactly to_out(attention(...)): separate projections and none of
    the extras diffusers' Attention can wrap around it (norms before, residual or rescale after)."""
    return (
        isinstance(getattr(attn, "to_v", None), nn.Module)
        and getattr(attn, "to_out", None) is not None
        and not getattr(attn, "fused_projections", False)
        and getattr(attn, "to_qkv", None) is None
        and getattr(attn, "spatial_norm", None) is None
        and getattr(attn, "group_norm", None) is None
        and not getattr(attn, "residual_connection", False)
        and getattr(attn, "rescale_output_factor", 1.0) == 1.0
    )


def plain_value_only(attn: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Identity self-attention: every token's output is its own value vector, then the output projection."""
    out = attn.to_v(hidden_states)
    for layer in attn.to_out:
        out = layer(out)
    return out


# --- a module's call arguments by name, traceable by torch.compile ------------------------------------------
# Blocks are called positionally by some models and with keywords by others. inspect cannot run inside
# torch.compile's tracing (a graph break inside a model's block loop makes dynamo give up on the whole forward),
# so a module class's parameters are read once, when a hook is installed, and calls only index tuples.

# Read once per class, when a hook is installed: a compiled call then only looks the class up (torch.compile
# guards on this dict, so every class a call will look up is read at install time, not during a first call).
_PARAMS: Dict[type, Tuple[Tuple[str, ...], Dict[str, Any]]] = {}


def read_signature(module: nn.Module) -> None:
    """Records the forward's positional-or-keyword parameter names and every parameter's default (call it at
    install time)."""
    cls = type(module)
    if cls in _PARAMS:
        return
    names, defaults = [], {}
    for param in list(inspect.signature(cls.forward).parameters.values())[1:]:
        if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            names.append(param.name)
        if param.default is not inspect.Parameter.empty:
            defaults[param.name] = param.default
    _PARAMS[cls] = (tuple(names), defaults)


def positional_names(module: nn.Module) -> Tuple[str, ...]:
    """The forward's positional-or-keyword parameter names, in order."""
    read_signature(module)
    return _PARAMS[type(module)][0]


def argument(module: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    """The value of forward parameter `name` in a call `module(*args, **kwargs)` (its default if not passed)."""
    read_signature(module)  # a no-op once installed hooks have read it
    names, defaults = _PARAMS[type(module)]
    i = names.index(name) if name in names else len(args)
    if i < len(args):
        return args[i]
    return kwargs[name] if name in kwargs else defaults[name]
