"""STG as a diffusers guider (stg_ext.guidance.guider.STGGuidance): HunyuanVideo 1.5 through apply_stg, a Wan modular
pipeline with the guider set by hand, and the guider protocol itself.

The HunyuanVideo 1.5 reference is the stock pipeline with a plain guider: a ClassifierFreeGuidance subclass
whose forward computes STG's f with tests/guidance/_reference.formula (float64) from a deep copy of the
transformer perturbed by the plain per-family reference of tests/weak/models, run on the cond batch's inputs.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance, SkipLayerGuidance
from diffusers.guiders.guider_utils import GuiderOutput

import stg_ext
from stg_ext.guidance.guider import STGGuidance
from stg_ext.testing.tiny import CFG_SCALE, tiny_pipeline
# Modules, not the classes: a Test* class imported here would be collected (and run) again.
from tests.weak.models import test_hunyuan_video15, test_wan

from . import test_guided_sampling as guided
from ._reference import Guidance, ReferenceSampler, formula

TOL = 1e-4
STEPS = 3
REFS_HV15 = {"residual": test_hunyuan_video15.skip_block, "attention": test_hunyuan_video15.identity_attn}
REFS_WAN = {"residual": test_wan.skip_block, "attention": test_wan.identity_attn1}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _check(out, ref, stock=None):
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= TOL * scale, f"max abs diff {err:.3g} > {TOL} x {scale:.3g}"
    if stock is not None:
        assert not torch.equal(out, stock), "STG changed nothing"


def _no_hooks(model):
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert "forward" not in module.__dict__ and (registry is None or not registry.hooks), module


# --- HunyuanVideo 1.5 -----------------------------------------------------------------------------------------

class PlainSTGGuider(ClassifierFreeGuidance):
    """ClassifierFreeGuidance that returns STG's f, computed plainly (see the module docstring)."""

    def attach(self, model, gd: Guidance, refs) -> "PlainSTGGuider":
        self.gd, self.model = gd, model
        self.weak = {}
        for mode in gd.modes:
            for layer in gd.layers():
                weak = copy.deepcopy(model)
                refs[mode](weak, layer)
                self.weak[(mode, layer)] = weak
        stock = model.forward

        def forward(*args, **kwargs):
            if self._count_prepared == 1:  # the cond batch runs first
                self.cond_call = (args, kwargs)
            return stock(*args, **kwargs)

        model.forward = forward
        return self

    def detach(self) -> None:
        del self.model.forward

    def forward(self, pred_cond, pred_uncond=None):
        n, step = self._num_inference_steps, self._step
        gd = self.gd.at(step)
        if not gd.start * n <= step < gd.stop * n:
            return super().forward(pred_cond, pred_uncond)
        args, kwargs = self.cond_call
        ps = [self.weak[(mode, gd.layer)](*args, **kwargs)[0] for mode in gd.modes]
        g = self.guidance_scale if self._is_cfg_enabled() else None
        f = formula(pred_uncond if g is not None else None, pred_cond, ps, g, gd)
        r = self.guidance_rescale
        if r:
            # Diffusers' guiders apply their guidance_rescale (against c) whether or not CFG is on at this step.
            c = pred_cond.double()
            f = r * f * (c.std(dim=list(range(1, c.dim())), keepdim=True) /
                         f.std(dim=list(range(1, f.dim())), keepdim=True)) + (1 - r) * f
        return GuiderOutput(pred=f.to(pred_cond.dtype), pred_cond=pred_cond, pred_uncond=pred_uncond)


@pytest.fixture(scope="module")
def hv15():
    return _quiet(tiny_pipeline, "hunyuan_video15")


def _run(tp, cfg=True, **overrides):
    return _quiet(lambda: tp.pipe(**tp.call_kwargs(steps=STEPS, cfg=cfg, **overrides)).frames)


def _apply(tp, *args, **kwargs):
    session = _quiet(stg_ext.apply_stg, tp.pipe, *args, **kwargs)
    assert isinstance(tp.pipe.guider, STGGuidance) and tp.pipe._stg_ext_session is session
    return session


def _hv15_reference(tp, gd: Guidance, cfg=True, guidance_rescale=0.0, **overrides):
    original = tp.pipe.guider
    plain = _quiet(PlainSTGGuider, guidance_scale=original.guidance_scale, guidance_rescale=guidance_rescale)
    tp.pipe.guider = plain.attach(tp.pipe.transformer, gd, REFS_HV15)
    try:
        return _run(tp, cfg=cfg, **overrides)
    finally:
        plain.detach()
        tp.pipe.guider = original


CASES = [(mode, rescale, window) for mode in ("residual", "attention") for rescale in (0.0, 0.7)
         for window in ((0.0, 1.0), (0.34, 1.0))]


@pytest.mark.parametrize("mode,rescale,window", CASES, ids=[f"{m}-r{r}-w{w[0]}" for m, r, w in CASES])
def test_hunyuan_video15_matches_reference(hv15, mode, rescale, window):
    stock = _run(hv15)
    gd = Guidance(layer=1, modes=(mode,), scales=(1.0,), rescale=rescale, start=window[0], stop=window[1])
    with _apply(hv15, 1, mode, scale=1.0, rescale=rescale, start=window[0], stop=window[1]):
        out = _run(hv15)
    _check(out, _hv15_reference(hv15, gd), stock)


def test_hunyuan_video15_guider_settings_carry_over(hv15):
    """The pipeline guider's guidance_rescale and CFG window stay in force under STG."""
    original = hv15.pipe.guider
    original.guidance_rescale, original._start = 0.5, 0.34
    try:
        stock = _run(hv15)
        gd = Guidance(layer=2, modes=("attention",), scales=(1.5,), rescale=0.7)
        with _apply(hv15, 2, "attention", scale=1.5, rescale=0.7):
            assert hv15.pipe.guider.guidance_rescale == 0.5 and hv15.pipe.guider._start == 0.34
            out = _run(hv15)
        plain = _quiet(PlainSTGGuider, guidance_scale=CFG_SCALE, guidance_rescale=0.5, start=0.34)
        hv15.pipe.guider = plain.attach(hv15.pipe.transformer, gd, REFS_HV15)
        try:
            ref = _run(hv15)
        finally:
            plain.detach()
            hv15.pipe.guider = original
        _check(out, ref, stock)
    finally:
        original.guidance_rescale, original._start = 0.0, 0.0


def test_hunyuan_video15_cfg_off_is_stg_alone(hv15):
    # call_kwargs(cfg=False) disables pipe.guider: on the STG guider that turns CFG off, not STG.
    stock = _run(hv15, cfg=False)
    gd = Guidance(layer=1, modes=("residual",), scales=(1.5,), rescale=0.7)
    try:
        with _apply(hv15, 1, "residual", scale=1.5, rescale=0.7):
            out = _run(hv15, cfg=False)
            assert hv15.pipe.guider.num_conditions == 2  # cond + perturbed, no uncond batch
        ref = _hv15_reference(hv15, gd, cfg=False)
    finally:
        hv15.pipe.guider.enable()
    _check(out, ref, stock)


def test_hunyuan_video15_scale_zero_and_remove_are_stock_bit_for_bit(hv15):
    original, config = hv15.pipe.guider, dict(hv15.pipe.config)
    stock = _run(hv15)
    with _apply(hv15, 1, "residual", scale=0.0, rescale=0.0):
        assert hv15.pipe.guider.num_conditions == 2  # no perturbed batch at all
        assert torch.equal(_run(hv15), stock)
    session = _apply(hv15, 1, "attention", scale=2.0)
    # The pipeline's config keeps naming the stock guider: save_pretrained writes it (issue 15).
    assert hv15.pipe.config["guider"] == config["guider"]
    assert not torch.equal(_run(hv15), stock)
    stg_ext.remove_stg(hv15.pipe)
    assert hv15.pipe.guider is original and dict(hv15.pipe.config) == config
    assert not hasattr(hv15.pipe, "_stg_ext_session")
    assert torch.equal(_run(hv15), stock)
    _no_hooks(hv15.pipe.transformer)
    del session


def test_hunyuan_video15_reapply_and_refuses_other_guiders(hv15):
    original = hv15.pipe.guider
    _apply(hv15, 1, "attention")
    _apply(hv15, 2, "residual", scale=0.5)  # replaces the first session, from the original guider
    assert hv15.pipe.guider.stg_layer == 2 and hv15.pipe.guider.guidance_scale == original.guidance_scale
    stg_ext.remove_stg(hv15.pipe)
    assert hv15.pipe.guider is original
    hv15.pipe.guider = _quiet(SkipLayerGuidance, skip_layer_guidance_layers=[1])
    try:
        with pytest.raises(TypeError, match="ClassifierFreeGuidance.*SkipLayerGuidance.*STGGuidance"):
            stg_ext.apply_stg(hv15.pipe, 1, "attention")
    finally:
        hv15.pipe.guider = original


# --- a modular pipeline ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan_modular():
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep

    tp = _quiet(tiny_pipeline, "wan", vae=False)
    pipe = _quiet(WanCoreDenoiseStep().init_pipeline)
    _quiet(pipe.update_components, transformer=tp.pipe.transformer, scheduler=tp.pipe.scheduler,
           guider=_quiet(ClassifierFreeGuidance, guidance_scale=CFG_SCALE))
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(tp.latent_shape, generator=torch.Generator().manual_seed(1))
    return tp, pipe, latents


def _modular(wan_modular, guider):
    """The modular pipeline's latents with `guider` (the denoise block asks for negative embeds even when the
    guider runs no unconditional batch)."""
    tp, pipe, latents = wan_modular
    kw = tp.call_kwargs(steps=STEPS)
    _quiet(pipe.update_components, guider=guider)
    return _quiet(pipe, prompt_embeds=kw["prompt_embeds"], negative_prompt_embeds=kw["negative_prompt_embeds"],
                  num_inference_steps=STEPS, height=kw["height"], width=kw["width"], num_frames=kw["num_frames"],
                  latents=latents.clone(), output="latents")


def _wan_reference(wan_modular, gd: Guidance, cfg=True):
    """The stock WanPipeline from the same latents, guided by _reference's sampler."""
    tp, _, latents = wan_modular
    kw = tp.call_kwargs(steps=STEPS, cfg=cfg, latents=latents.clone())
    sampler = ReferenceSampler(tp.pipe.transformer, gd, STEPS, "separate",
                               cfg_scale=(lambda step: CFG_SCALE) if cfg else (lambda step: None),
                               perturb=lambda m, mode, layer: REFS_WAN[mode](m, layer),
                               negative=guided._swap({"encoder_hidden_states": "negative_prompt_embeds"}, kw))
    try:
        return _quiet(lambda: tp.pipe(**kw).frames)
    finally:
        sampler.remove()


@pytest.mark.parametrize("mode", ["residual", "attention"])
def test_modular_wan_matches_reference(wan_modular, mode):
    stock = _modular(wan_modular, _quiet(ClassifierFreeGuidance, guidance_scale=CFG_SCALE))
    guider = _quiet(STGGuidance, stg_layer=1, stg_mode=mode, stg_scale=1.0, stg_rescale=0.7, stg_start=0.34,
                    guidance_scale=CFG_SCALE)
    try:
        out = _modular(wan_modular, guider)
    finally:
        guider.remove_hooks()  # before the reference deep-copies the transformer
    _no_hooks(wan_modular[0].pipe.transformer)
    gd = Guidance(layer=1, modes=(mode,), scales=(1.0,), rescale=0.7, start=0.34)
    _check(out, _wan_reference(wan_modular, gd), stock)


def test_modular_wan_factorized_per_step_and_cfg_off(wan_modular):
    # Two modes: one perturbed batch each ("pred_cond_stg_residual", "pred_cond_stg_attention"); per-step scales.
    guider = _quiet(STGGuidance, stg_layer=stg_ext.per_step([1, 2, 1]), stg_mode=("residual", "attention"),
                    stg_scale=[(1.0, 0.5), (0.0, 0.0), (0.5, 1.0)], guidance_scale=CFG_SCALE)
    try:
        out = _modular(wan_modular, guider)
    finally:
        guider.remove_hooks()
    gd = Guidance(layer=1, modes=("residual", "attention"), scales=(1.0, 0.5), step_layers=[1, 2, 1],
                  step_scales=[(1.0, 0.5), (0.0, 0.0), (0.5, 1.0)])
    _check(out, _wan_reference(wan_modular, gd))
    # CFG off (the guider disabled): STG alone.
    guider = _quiet(STGGuidance, stg_layer=1, stg_mode="attention", stg_scale=1.5, enabled=False)
    stock = _modular(wan_modular, _quiet(ClassifierFreeGuidance, guidance_scale=CFG_SCALE, enabled=False))
    try:
        out = _modular(wan_modular, guider)
    finally:
        guider.remove_hooks()
    _check(out, _wan_reference(wan_modular, Guidance(layer=1, modes=("attention",), scales=(1.5,)), cfg=False), stock)


def test_modular_wan_scale_zero_is_cfg_bit_for_bit(wan_modular):
    stock = _modular(wan_modular, _quiet(ClassifierFreeGuidance, guidance_scale=CFG_SCALE))
    guider = _quiet(STGGuidance, stg_layer=1, stg_scale=0.0, guidance_scale=CFG_SCALE)
    assert torch.equal(_modular(wan_modular, guider), stock)
    _no_hooks(wan_modular[0].pipe.transformer)  # no perturbed batch ran: no hooks were ever installed


# --- the guider protocol ----------------------------------------------------------------------------------------

def _batches(guider):
    return [getattr(b, "__guidance_identifier__") for b in guider.prepare_inputs(
        {"encoder_hidden_states": (torch.ones(1), torch.zeros(1))})]


def test_batches_follow_the_step_windows():
    guider = _quiet(STGGuidance, stg_layer=0, stg_start=0.5, guidance_scale=5.0, stop=0.75)
    seen = []
    for step in range(4):
        guider.set_state(step, 4, torch.tensor(0))
        seen.append(_batches(guider))
    # CFG: int(0 * 4) <= i < int(0.75 * 4); STG: 0.5 * 4 <= i < 1.0 * 4.
    assert seen == [["pred_cond", "pred_uncond"], ["pred_cond", "pred_uncond"],
                    ["pred_cond", "pred_uncond", "pred_cond_stg"], ["pred_cond", "pred_cond_stg"]]
    guider.set_state(2, 4, torch.tensor(0))
    states = guider.prepare_inputs({"encoder_hidden_states": (torch.ones(1), torch.zeros(1))})
    assert [float(s.encoder_hidden_states) for s in states] == [1.0, 0.0, 1.0]  # the perturbed batch is cond
    conditional = []
    for _ in states:
        guider._count_prepared += 1  # what prepare_models counts (without a denoiser to perturb)
        conditional.append(guider.is_conditional)
    assert conditional == [True, False, True]


def test_forward_is_cfg_bit_for_bit_without_stg_and_combine_with_it():
    c, u, p = torch.randn(3, 2, 4, 3, 8, 8).unbind(0)
    for original in (False, True):
        cfg = _quiet(ClassifierFreeGuidance, guidance_scale=4.5, guidance_rescale=0.3,
                     use_original_formulation=original)
        stg = _quiet(STGGuidance, stg_layer=0, stg_scale=0.0, guidance_scale=4.5, guidance_rescale=0.3,
                     use_original_formulation=original)
        for g in (cfg, stg):
            g.set_state(0, 2, torch.tensor(0))
        assert torch.equal(stg.forward(c, u).pred, cfg.forward(c, u).pred)
        stg.stg_scale = 1.25  # guiders read their attributes at each step
        gd = Guidance(layer=0, modes=("attention",), scales=(1.25,), guidance_rescale=0.3)
        ref = formula(u, c, [p], 5.5 if original else 4.5, gd).float()
        torch.testing.assert_close(stg.forward(c, u, pred_cond_stg=p).pred, ref, rtol=1e-5, atol=1e-5)


def test_per_step_length_names_n_and_bad_options_are_clear():
    guider = _quiet(STGGuidance, stg_layer=0, stg_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="2 entries but the pipeline runs 3 steps"):
        guider.set_state(0, 3, torch.tensor(0))
    with pytest.raises(TypeError, match="stg_layer is required"):
        _quiet(STGGuidance)
    with pytest.raises(ValueError, match="rescale must be in"):
        _quiet(STGGuidance, stg_layer=0, stg_rescale=2.0)
    with pytest.raises(TypeError, match="layer must be an index"):
        _quiet(STGGuidance, stg_layer=1.5)


def test_bad_layer_or_mode_fails_at_the_first_perturbed_batch_naming_what_is_valid(wan_modular):
    for kw, error, match in [(dict(stg_layer=7), IndexError, r"valid indices are 0\.\.2"),
                             (dict(stg_layer=1, stg_mode="bogus"), ValueError, "valid modes: 'attention', 'residual'")]:
        guider = _quiet(STGGuidance, guidance_scale=CFG_SCALE, **kw)
        with pytest.raises(error, match=match):
            _modular(wan_modular, guider)
        guider.remove_hooks()
    _no_hooks(wan_modular[0].pipe.transformer)


def test_two_guiders_on_one_denoiser_fail_clearly(wan_modular):
    first = _quiet(STGGuidance, stg_layer=1, guidance_scale=CFG_SCALE)
    second = _quiet(STGGuidance, stg_layer=1, guidance_scale=CFG_SCALE)
    try:
        _modular(wan_modular, first)
        with pytest.raises(RuntimeError, match="another STGGuidance; call that guider's remove_hooks"):
            _modular(wan_modular, second)
    finally:
        first.remove_hooks()
        second.remove_hooks()
    _modular(wan_modular, second)  # free again
    second.remove_hooks()
    _no_hooks(wan_modular[0].pipe.transformer)


def test_config_round_trip():
    guider = _quiet(STGGuidance, stg_layer=[1, 2], stg_mode=("spatial", "temporal"), stg_scale=(1.0, 0.5),
                    stg_orthogonalize=True, guidance_scale=6.0, enabled=False)
    again = _quiet(guider.new, stg_rescale=0.5)
    assert again.stg_mode == ("spatial", "temporal") and list(again.stg_scale) == [1.0, 0.5]
    assert again.stg_rescale == 0.5 and again.guidance_scale == 6.0 and not again._enabled
    assert again._input_predictions == ["pred_cond", "pred_uncond", "pred_cond_stg_spatial", "pred_cond_stg_temporal"]
    assert '"stg_layer"' in guider.to_json_string()
