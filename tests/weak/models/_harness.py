"""Shared tests of the weak model (STG_SPEC section 3) for every model family.

A family's test file defines a `ModelCase` and a subclass of `WeakModelTests`. The references here are
written plainly against diffusers' modules, without stg_ext's code:
- STG-R: the case patches the block(s) of a deep copy to return their inputs;
- STG-A, video-only self-attention: the copy's attention module returns to_out(to_v(x));
- STG-A, joint attention: the copy's SDPA calls get a full boolean mask that lets each video query see only
  itself and the (valid) text keys — a different formula from stg_ext's softmax over 1 + T logits.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import stg_ext

TOL = 1e-5  # fp32: max abs diff <= TOL * max|c|


@dataclass
class ModelCase:
    name: str
    build: Callable[[], nn.Module]  # seeded, eval mode, fp32
    inputs: Callable[[], Dict]  # model kwargs (fp32); the harness adds return_dict=False
    n_layers: int
    # Patch a deep copy so it computes the perturbed model for layer index i (plain code per family).
    reference_residual: Callable[[nn.Module, int], None]
    reference_attention: Callable[[nn.Module, int], None]
    modes: Sequence[str] = ("residual", "attention")
    low_precision: Sequence[torch.dtype] = (torch.bfloat16, torch.float16)
    layer_paths: Optional[Callable[[int], str]] = None  # module path of layer i (for path addressing)
    output: Callable[[object], torch.Tensor] = lambda out: out[0]


def run(model: nn.Module, inputs: Dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


# --- plain references ------------------------------------------------------------------------------

def value_identity(attn: nn.Module) -> None:
    """Video-only self-attention with the identity map: each token's output is its value, projected."""

    def forward(hidden_states, *args, **kwargs):
        out = attn.to_v(hidden_states)
        for layer in attn.to_out:
            out = layer(out)
        return out

    attn.forward = forward


class _MaskedJointSDPA(TorchFunctionMode):
    def __init__(self, n_video: int, video_first: bool):
        super().__init__()
        self.n_video, self.video_first = n_video, video_first

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, args), **kwargs)
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        s = q.shape[-2]
        is_video = torch.zeros(s, dtype=torch.bool)
        if self.video_first:
            is_video[: self.n_video] = True
        else:
            is_video[s - self.n_video:] = True
        # Video rows: only the diagonal among video keys; text keys as the model's mask says.
        allowed = ~(is_video[:, None] & is_video[None, :]) | torch.eye(s, dtype=torch.bool)
        if mask is not None:
            if mask.dtype == torch.bool:
                allowed = allowed & mask
                allowed = allowed | (torch.eye(s, dtype=torch.bool) & is_video[:, None])
            else:
                bias = mask.masked_fill(~allowed, float("-inf"))
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=a.get("scale"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=a.get("scale"))


def joint_identity(attn: nn.Module, video_first: bool) -> None:
    """Joint attention whose video queries see only themselves and the text keys (masked full attention)."""
    original = attn.forward

    def forward(*args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with _MaskedJointSDPA(hidden.shape[1], video_first):
            return original(*args, **kwargs)

    attn.forward = forward


# --- the tests ---------------------------------------------------------------------------------------

class WeakModelTests:
    case: ModelCase

    def _layers(self):
        n = self.case.n_layers
        return sorted({0, n // 2, n - 1})

    def _reference(self, model, inputs, mode, i):
        ref = copy.deepcopy(model)
        patch = self.case.reference_residual if mode == "residual" else self.case.reference_attention
        patch(ref, i)
        return run(ref, inputs)

    @pytest.mark.parametrize("value_only", [True, False], ids=["value-only", "intercept"])
    def test_perturbed_matches_plain_reference(self, model, inputs, cond, value_only):
        for mode in self.case.modes:
            for i in self._layers():
                with stg_ext.perturbed(model, i, mode, value_only=value_only):
                    p = run(model, inputs)
                want = self._reference(model, inputs, mode, i)
                diff = (p - want).abs().max().item()
                assert diff <= TOL * cond.abs().max().item(), f"{mode} layer {i}: max abs diff {diff}"
                assert not torch.equal(p, cond), f"{mode} layer {i}: the perturbation changed nothing"

    def test_remove_restores_bit_for_bit(self, model, inputs, cond):
        pristine = copy.deepcopy(model)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for mode in self.case.modes:
            handle = stg_ext.weak_model(model, -1, mode)
            assert not torch.equal(run(model, inputs), cond)
            handle.remove()
            assert torch.equal(run(model, inputs), run(pristine, inputs))
            with stg_ext.perturbed(model, 0, mode):
                pass
            assert torch.equal(run(model, inputs), cond)
        after = model.state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], v) for k, v in state.items())
        assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())

    def test_apply_twice_replaces(self, model, inputs):
        mode = self.case.modes[0]
        with stg_ext.perturbed(model, self.case.n_layers - 1, mode):
            want = run(model, inputs)
        stg_ext.weak_model(model, 0, mode)
        handle = stg_ext.weak_model(model, self.case.n_layers - 1, mode)
        try:
            assert torch.equal(run(model, inputs), want)
        finally:
            handle.remove()
        stg_ext.remove_stg(model)

    def test_addressing(self, model, inputs):
        n, mode = self.case.n_layers, self.case.modes[0]
        with stg_ext.perturbed(model, n - 1, mode):
            last = run(model, inputs)
        with stg_ext.perturbed(model, -1, mode):
            assert torch.equal(run(model, inputs), last)
        if self.case.layer_paths is not None:
            with stg_ext.perturbed(model, self.case.layer_paths(n - 1), mode):
                assert torch.equal(run(model, inputs), last)
        assert len(stg_ext.resolve_layers(stg_ext.weak.adapters.get_adapter(model), model, list(range(n)))) == n

    def test_bad_input_is_named(self, model):
        n = self.case.n_layers
        with pytest.raises(IndexError, match=rf"valid indices are 0\.\.{n - 1}"):
            stg_ext.perturbed(model, n, self.case.modes[0])
        with pytest.raises(ValueError, match="valid modes"):
            stg_ext.perturbed(model, 0, "bogus")
        if "temporal" not in self.case.modes:
            with pytest.raises(ValueError, match="'temporal' is not available"):
                stg_ext.perturbed(model, 0, "temporal")
        with pytest.raises(ValueError, match="not a layer"):
            stg_ext.perturbed(model, "no.such.block", self.case.modes[0])

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
    def test_low_precision(self, model, inputs, dtype):
        if dtype not in self.case.low_precision:
            pytest.skip(f"{self.case.name} is not run in {dtype} on the CPU here")
        low = copy.deepcopy(model).to(dtype)
        low_inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        c = run(low, low_inputs)
        for mode in self.case.modes:
            with stg_ext.perturbed(low, -1, mode):
                p = run(low, low_inputs)
            want = self._reference(low, low_inputs, mode, self.case.n_layers - 1)
            assert torch.isfinite(p).all() and not torch.equal(p, c)
            torch.testing.assert_close(p.float(), want.float(), atol=0.05 * c.abs().max().item(), rtol=0.05)

    @pytest.mark.dynamo
    def test_compiled_model(self, model, inputs):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        for mode in self.case.modes:
            with stg_ext.perturbed(compiled, -1, mode):
                p = run(compiled, inputs)
            with stg_ext.perturbed(model, -1, mode):
                want = run(model, inputs)
            torch.testing.assert_close(p, want, atol=TOL * want.abs().max().item(), rtol=0)
        torch._dynamo.reset()
