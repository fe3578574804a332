"""STG-A by interception: while a perturbed self-attention module runs, its scaled_dot_product_attention
call returns the identity attention instead (STG_SPEC section 3).

Two ways, the same result: `IdentityProcessor` runs a twin of the module's attention processor whose globals
name stg_ext's identity in place of `F.scaled_dot_product_attention` and diffusers' `dispatch_attention_fn` (plain
Python that torch.compile traces like the processor itself); `IdentityAttentionMode` (a TorchFunctionMode, eager
only) catches the call wherever it comes from, for modules without a processor.

This is exact for every processor that routes attention through `F.scaled_dot_product_attention` (all
diffusers video processors do, directly or through `dispatch_attention_fn`'s native backend), whatever it
does before (projections, norms, rotary embeddings, concatenation) or after (splits, output projections,
gates). Video-only self-attention gets V; joint attention gets, per video query, a softmax over itself and
the text keys (`stg_ext.ops.identity_joint_attention`), and the text queries attend as usual.
"""
from __future__ import annotations

import copy
import inspect
import types
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .adapters.base import JointLayout
from ..ops import identity_joint_attention


def _sdpa_args(args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    # Grouped-query attention: each group of query heads shares one key/value head.
    return x if x.shape[-3] == heads else x.repeat_interleave(heads // x.shape[-3], dim=-3)


def _as_bias(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def joint_identity_sdpa(query, key, value, attn_mask, scale, n_video: int, layout: JointLayout) -> torch.Tensor:
    """Identity attention on a joint [video; text] (or [text; video]) sequence, in SDPA's (B, H, S, D) layout."""

    heads, seq = query.shape[-3], query.shape[-2]
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    n_text = seq - n_video
    if n_text < 0:
        raise RuntimeError(f"stg_ext: joint attention saw {seq} tokens but the module received {n_video} video tokens")
    video = slice(0, n_video) if layout.video_first else slice(n_text, seq)
    text = slice(n_video, seq) if layout.video_first else slice(0, n_text)
    scale = query.shape[-1] ** -0.5 if scale is None else scale

    # Text queries: exactly as in the unperturbed model (their mask rows, all keys).
    text_rows_mask = attn_mask
    if attn_mask is not None and attn_mask.shape[-2] != 1:
        text_rows_mask = attn_mask[..., text, :]
    out_text = F.scaled_dot_product_attention(query[..., text, :], key, value, attn_mask=text_rows_mask, scale=scale)

    # Video queries: themselves and the text keys the mask lets them see.
    text_bias = None
    if attn_mask is not None:
        rows = attn_mask[..., video, :] if attn_mask.shape[-2] != 1 else attn_mask
        text_bias = _as_bias(rows[..., text], torch.float32)
    out_video = identity_joint_attention(query[..., video, :], key[..., video, :], value[..., video, :],
                                         key[..., text, :], value[..., text, :], text_bias=text_bias, scale=scale)
    parts = (out_video, out_text) if layout.video_first else (out_text, out_video)
    return torch.cat(parts, dim=-2)


class IdentityAttentionMode(TorchFunctionMode):
    """Inside, F.scaled_dot_product_attention computes STG-A's identity attention.

    `joint` None: video-only self-attention, the output is V. Otherwise `n_video` is the number of video
    tokens of the module's input and `joint` says where they sit in the SDPA sequence.
    """

    def __init__(self, joint: Optional[JointLayout] = None, n_video: Optional[int] = None):
        super().__init__()
        self.joint = joint
        self.n_video = n_video
        self.intercepted = 0  # SDPA calls turned into identity attention (0 means nothing was perturbed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.intercepted += 1
        a = _sdpa_args(args, kwargs)
        if a.get("is_causal"):
            raise NotImplementedError("stg_ext: identity attention under is_causal=True is not defined")
        q, k, v = a["query"], a["key"], a["value"]
        if self.joint is None:
            if q.shape[-2] != v.shape[-2]:
                raise RuntimeError("stg_ext: STG-A target is a cross-attention (query and key lengths differ)")
            return _repeat_kv(v, q.shape[-3])
        return joint_identity_sdpa(q, k, v, a.get("attn_mask"), a.get("scale"), self.n_video, self.joint)


def identity_sdpa(query, key, value, attn_mask, is_causal, scale, n_video: Optional[int],
                  joint: Optional[JointLayout]) -> torch.Tensor:
    """STG-A's replacement of one `scaled_dot_product_attention(query, key, value, ...)` call (B, H, S, D)."""
    if is_causal:
        raise NotImplementedError("stg_ext: identity attention under is_causal=True is not defined")
    if joint is None:
        if query.shape[-2] != value.shape[-2]:
            raise RuntimeError("stg_ext: STG-A target is a cross-attention (query and key lengths differ)")
        return _repeat_kv(value, query.shape[-3])
    return joint_identity_sdpa(query, key, value, attn_mask, scale, n_video, joint)


def _renamed(code: types.CodeType, names: Dict[str, str]) -> types.CodeType:
    """`code` (and the functions defined inside it) with global names renamed."""
    consts = tuple(_renamed(c, names) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_names=tuple(names.get(n, n) for n in code.co_names), co_consts=consts)


class IdentityProcessor:
    """Runs a module's attention processor with STG-A's identity in place of its attention call.

    Built once per processor (outside any compiled region): a copy of the processor's `__call__` whose global
    names `F` and `dispatch_attention_fn` (diffusers' backend dispatch, (B, S, H, D) layout) are renamed to
    stg_ext's twins, added to the same module's globals: `F`'s twin is torch.nn.functional but for
    `scaled_dot_product_attention`. The copy keeps the processor module's globals, so torch.compile traces it
    like the processor itself. `release()` takes the added names out again."""

    def __init__(self, processor: Any, joint: Optional[JointLayout]):
        self.processor, self.joint = processor, joint
        self.n_video: Optional[int] = None
        self.calls = 0  # attention calls replaced (0 after a call means the processor made none stg_ext knows)
        call = type(processor).__call__
        twin = self

        def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         scale=None, enable_gqa=False):
            twin.calls += 1
            return identity_sdpa(query, key, value, attn_mask, is_causal, scale, twin.n_video, twin.joint)

        def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                  enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
            twin.calls += 1
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            return identity_sdpa(q, k, v, attn_mask, is_causal, scale, twin.n_video, twin.joint).transpose(1, 2)

        functional = types.ModuleType("torch.nn.functional")
        functional.__dict__.update(F.__dict__)
        functional.scaled_dot_product_attention = scaled_dot_product_attention
        prefix = f"__stg_ext_identity_{id(self):x}_"
        self._globals = call.__globals__
        self._added = {prefix + "F": functional, prefix + "dispatch_attention_fn": dispatch_attention_fn}
        self._globals.update(self._added)
        code = _renamed(call.__code__, {"F": prefix + "F", "dispatch_attention_fn": prefix + "dispatch_attention_fn"})
        self._call = types.FunctionType(code, self._globals, call.__name__, call.__defaults__, call.__closure__)
        self._call.__kwdefaults__ = call.__kwdefaults__
        signature = inspect.signature(call)
        self.parameters = set(signature.parameters) - {"self"}
        self.takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())

    def __deepcopy__(self, memo: dict) -> "IdentityProcessor":
        """A twin of the copied processor (its own names in the module's globals, which are not copied: a module
        holds imported modules, which cannot be copied)."""
        return IdentityProcessor(copy.deepcopy(self.processor, memo), self.joint)

    @staticmethod
    def applies_to(processor: Any) -> bool:
        call = getattr(type(processor), "__call__", None)
        return isinstance(call, types.FunctionType) and ("F" in call.__code__.co_names
                                                         or "dispatch_attention_fn" in call.__code__.co_names)

    def release(self) -> None:
        for name in self._added:
            self._globals.pop(name, None)
        self._added = {}

    def __call__(self, module: nn.Module, *args, **kwargs) -> Any:
        """What `module.forward(*args, **kwargs)` returns with the identity (the module's forward passes its
        arguments to the processor in the same order, dropping keywords the processor does not take)."""
        if not self.takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in self.parameters}
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.n_video, self.calls = hidden.shape[1], 0
        out = self._call(self.processor, module, *args, **kwargs)
        return out
