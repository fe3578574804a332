"""Batches that are not [uncond, cond] (issue 15): a hook outside STG's that sends only the cond half on some calls
(as FasterCache's CFG cache does) and builds its own u~ from what the call returns.

Such a call returns c' = c + (s/g)(c - p), so that the hook's u~ + g (c' - u~) is u~ + g (c - u~) + s (c - p) for
any u~; with STG's rescale (which needs u) it is an error. Checked on a custom loop (apply_stg(model,
cfg_scale=...)) with the tiny Wan transformer: c and p from the stock model and a plainly perturbed deep copy."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import stg_ext

from .._reference import tiny_wan_call
from ._reference import FAMILIES, perturbation

G, S = 4.0, 1.5


class CondOnlyEveryOtherCall(ModelHook):
    """A stand-in for a CFG cache: every other call runs the cond rows only and estimates u~ = x + delta, with delta
    the u - c of the last full call."""

    def __init__(self):
        super().__init__()
        self.calls, self.delta, self.returned = 0, None, []

    def new_forward(self, module, hidden_states, timestep, encoder_hidden_states, **kwargs):
        self.calls += 1
        if self.calls % 2 == 1:
            out = self.fn_ref.original_forward(hidden_states, timestep, encoder_hidden_states, **kwargs)[0]
            u, x = out.chunk(2)
            self.delta = u - x
        else:
            b = hidden_states.shape[0] // 2
            x = self.fn_ref.original_forward(hidden_states[b:], timestep[b:], encoder_hidden_states[b:], **kwargs)[0]
            out = torch.cat([x + self.delta, x])
        self.returned.append(x)
        return (out,)


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_call()


@pytest.mark.parametrize("mode", ["attention", "residual"])
def test_cond_only_call_returns_the_folded_cond(wan, mode):
    model, x, neg, pos = wan
    model = copy.deepcopy(model)
    weak = copy.deepcopy(model)
    perturbation(FAMILIES["wan"], mode)(weak, 1)
    t = torch.tensor([500.0])
    with torch.no_grad():
        c = model(x, t, pos, return_dict=False)[0]
        p = weak(x, t, pos, return_dict=False)[0]
        session = stg_ext.apply_stg(model, 1, mode, cfg_scale=G, scale=S)
        hook = CondOnlyEveryOtherCall()
        HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, "a_cfg_cache")
        batch = dict(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                     encoder_hidden_states=torch.cat([neg, pos]), return_dict=False)
        session.set_step(0, 2)
        model(**batch)
        session.set_step(1, 2)
        u_est, c_folded = model(**batch)[0].chunk(2)
        session.remove()
    expected = c.double() + (S / G) * (c.double() - p.double())
    torch.testing.assert_close(c_folded.double(), expected, rtol=0, atol=1e-5 * c.abs().max().item())
    # The loop's own CFG line then gives STG's f with the hook's u~.
    f = u_est + G * (c_folded - u_est)
    torch.testing.assert_close(f.double(), u_est.double() + G * (c.double() - u_est.double()) + S * (c - p).double(),
                               rtol=0, atol=1e-4 * f.abs().max().item())


def test_cond_only_call_with_rescale_is_a_clear_error(wan):
    model, x, neg, pos = wan
    model = copy.deepcopy(model)
    t = torch.tensor([500.0])
    session = stg_ext.apply_stg(model, 1, "attention", cfg_scale=G, rescale=0.7)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(CondOnlyEveryOtherCall(), "a_cfg_cache")
    batch = dict(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                 encoder_hidden_states=torch.cat([neg, pos]), return_dict=False)
    with torch.no_grad():
        model(**batch)
        with pytest.raises(RuntimeError, match="rescale needs u.*only the cond half"):
            model(**batch)
    session.remove()
