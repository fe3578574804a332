"""The cheap variants users run (issue 13), exact to their own definitions against plain reference loops:

- placement="uncond": the uncond pass runs on the weak model, f = u_p + g (c - u_p), no third pass;
- every=k: within the window the perturbed branch runs on every k-th step, the steps between reuse the last
  delta c - p: f = u + g (c - u) + s d.

References: hand-written sampling loops over the stock scheduler, with p and u_p from a deep copy of the denoiser
made weak by stg_ext.weak_model (itself checked against plain per-family references in tests/weak), the
combination written out in float64. Tiny random pipelines, CPU, fp32, latent output.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

STEPS = 4


def _run(pipe, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(**kw).frames


def _weak(model, layer, mode):
    weak = copy.deepcopy(model)
    stg_ext.weak_model(weak, layer, mode)
    return weak


def _wan_reference(tp, latents, combine, steps=STEPS):
    """Wan's loop (cond call, uncond call, CFG line, scheduler step) with `combine(i, x, t) -> noise`."""
    pipe = tp.pipe
    pipe.scheduler.set_timesteps(steps)
    x = latents.clone()
    for i, t in enumerate(pipe.scheduler.timesteps):
        noise = combine(i, x, t.expand(x.shape[0]))
        x = pipe.scheduler.step(noise, t, x, return_dict=False)[0]
    return x


def _call(model, x, t, embeds):
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]


@pytest.mark.parametrize("mode", ["attention", "residual"])
def test_placement_uncond_on_separate_calls(mode):
    tp = tiny_pipeline("wan", vae=False)
    kw = tp.call_kwargs(steps=STEPS)
    g, pos, neg = kw["guidance_scale"], kw["prompt_embeds"], kw["negative_prompt_embeds"]
    latents = torch.randn(tp.latent_shape, generator=torch.Generator().manual_seed(1))
    model = tp.pipe.transformer
    weak = _weak(model, 1, mode)

    def combine(i, x, t):
        c, u_p = _call(model, x, t, pos).double(), _call(weak, x, t, neg).double()
        return (u_p + g * (c - u_p)).float()

    want = _wan_reference(tp, latents, combine)
    with stg_ext.apply_stg(tp.pipe, 1, mode, placement="uncond"):
        got = _run(tp.pipe, {**tp.call_kwargs(steps=STEPS), "latents": latents})
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)
    stock = _run(tp.pipe, {**tp.call_kwargs(steps=STEPS), "latents": latents})
    assert not torch.allclose(stock, got)
    with stg_ext.apply_stg(tp.pipe, 1, mode, placement="uncond", scale=0.0):  # scale 0: stock, bit for bit
        assert torch.equal(_run(tp.pipe, {**tp.call_kwargs(steps=STEPS), "latents": latents}), stock)


@pytest.mark.parametrize("every", [2, 3])
def test_every_k_reuses_the_last_delta(every):
    tp = tiny_pipeline("wan", vae=False)
    kw = tp.call_kwargs(steps=STEPS)
    g, pos, neg = kw["guidance_scale"], kw["prompt_embeds"], kw["negative_prompt_embeds"]
    s, start = 1.5, 0.25  # window: steps 1..3
    latents = torch.randn(tp.latent_shape, generator=torch.Generator().manual_seed(2))
    model = tp.pipe.transformer
    weak = _weak(model, 1, "residual")
    fresh_steps, delta = [], {}

    def combine(i, x, t):
        c, u = _call(model, x, t, pos).double(), _call(model, x, t, neg).double()
        f = u + g * (c - u)
        if i >= start * STEPS:
            if (i - 1) % every == 0:
                delta["d"] = c - _call(weak, x, t, pos).double()
                fresh_steps.append(i)
            f = f + s * delta["d"]
        return f.float()

    want = _wan_reference(tp, latents, combine)
    assert fresh_steps == list(range(1, STEPS, every))
    runs = []
    hook = tp.pipe.transformer.blocks[-1].register_forward_pre_hook(lambda m, a: runs.append(1))
    with stg_ext.apply_stg(tp.pipe, 1, "residual", scale=s, start=start, every=every):
        got = _run(tp.pipe, {**tp.call_kwargs(steps=STEPS), "latents": latents})
    hook.remove()
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)
    assert len(runs) == 2 * STEPS + len(fresh_steps)  # perturbed suffixes only on the fresh steps


@pytest.mark.parametrize("family", ["mochi", "ltx"])
def test_cheap_variants_on_one_call_per_step(family):
    # [uncond, cond] in one call: placement="uncond" perturbs the uncond rows only; every=2 equals its definition
    # computed from two runs of stg_ext's own exact STG (every=1) at the fresh steps.
    tp = tiny_pipeline(family, vae=False)
    stock = _run(tp.pipe, tp.call_kwargs(steps=STEPS))
    with stg_ext.apply_stg(tp.pipe, 1, "attention", placement="uncond"):
        cheap = _run(tp.pipe, tp.call_kwargs(steps=STEPS))
    assert not torch.allclose(cheap, stock)
    model = tp.pipe.transformer
    weak = _weak(model, 1, "attention")
    seen = {}

    def route(module, args, kwargs):  # the reference: the stock call on [u, c], then the weak model on u's rows
        x = kwargs["hidden_states"]
        half = x.shape[0] // 2
        rows = {k: (v[:half] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == x.shape[0] else v)
                for k, v in kwargs.items()}
        seen["u_p"] = weak(**rows)[0]
        return args, kwargs

    def replace(module, args, kwargs, out):
        pred = out[0]
        half = pred.shape[0] // 2
        return (torch.cat([seen["u_p"], pred[half:]]),) + tuple(out[1:])

    h1 = model.register_forward_pre_hook(route, with_kwargs=True)
    h2 = model.register_forward_hook(replace, with_kwargs=True)
    want = _run(tp.pipe, tp.call_kwargs(steps=STEPS))
    h1.remove()
    h2.remove()
    torch.testing.assert_close(cheap, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_placement_uncond_without_cfg_is_an_error():
    tp = tiny_pipeline("wan", vae=False)
    with stg_ext.apply_stg(tp.pipe, 1, "attention", placement="uncond"):
        with pytest.raises(RuntimeError, match="placement='uncond' perturbs the uncond pass"):
            _run(tp.pipe, tp.call_kwargs(steps=2, cfg=False))
    with pytest.raises(ValueError, match="unknown placement 'both'; valid: cond, uncond"):
        stg_ext.apply_stg(tp.pipe, 1, "attention", placement="both")
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        stg_ext.apply_stg(tp.pipe, 1, "attention", every=0)
    with pytest.raises(ValueError, match="rescale and every apply to placement='cond' only"):
        stg_ext.apply_stg(tp.pipe, 1, "attention", placement="uncond", rescale=0.7)
