"""apply_stg on the remaining stock pipelines, its errors, and how it composes (issue 4).

- Every tiny family not covered by test_guided_sampling.py runs with STG in both modes, STG changes the latents,
  scale 0 (rescale 0) is the stock pipeline bit for bit, and remove_stg restores it bit for bit; the families
  whose calls the reference of _reference.py can follow cheaply are also checked against it (Wan 2.2 with both
  experts and their own CFG scales, SkyReels-V2, LTX I2V, Allegro, EasyAnimate with its guidance_rescale).
- Errors: LTX-2 (its own STG), unknown pipelines, bad layers / modes, per-step sequences of the wrong length.
- Composition: two pipelines in one process (interleaved and nested), per-step sequences against the reference,
  offloading (accelerate's model offload, diffusers' group offload), diffusers' First Block Cache, and the
  bare-denoiser mode for custom loops.

Tiny random pipelines from stg_ext.testing.tiny, CPU, fp32, 3 steps, latent output; tolerance as test_guided_sampling.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List

import pytest
import torch

import stg_ext
from stg_ext.testing.tiny import CFG_SCALE, tiny_pipeline
# Modules, not the classes: a Test* class imported here would be collected (and run) again.
from tests.weak.models import test_allegro, test_easyanimate, test_ltx, test_wan

from . import test_guided_sampling as guided
from ._reference import Guidance, ReferenceSampler, formula, tiny_wan_call

TOL = guided.TOL
STEPS = 3
COVERED = ["ltx_i2v", "wan22", "skyreels_v2", "allegro", "cosmos", "easyanimate"]
MODES = ["residual", "attention"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def pipelines():
    cache = {}

    def get(name, seed=0):
        if (name, seed) not in cache:
            cache[name, seed] = _quiet(tiny_pipeline, name, seed=seed, vae=False)
        return cache[name, seed]
    return get


def _latents(tp, steps=STEPS, **overrides) -> torch.Tensor:
    return _quiet(lambda: tp.pipe(**tp.call_kwargs(steps=steps, **overrides)).frames)


def _no_hooks(tp) -> None:
    assert not hasattr(tp.pipe, "_stg_ext_session")
    for name in tp.denoiser_attrs:
        for module in getattr(tp.pipe, name).modules():
            # The pipeline's own cache_context leaves an empty hook registry on the denoiser; no hook may remain.
            registry = getattr(module, "_diffusers_hook", None)
            assert "forward" not in module.__dict__ and (registry is None or not registry.hooks), module


# --- every family runs, honours scale 0, and removes cleanly ----------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", COVERED)
def test_runs_scale_zero_and_remove_are_stock_bit_for_bit(pipelines, family, mode):
    tp = pipelines(family)
    stock = _latents(tp)
    with stg_ext.apply_stg(tp.pipe, 1, mode, scale=0.0, rescale=0.0):
        assert torch.equal(_latents(tp), stock)
    session = stg_ext.apply_stg(tp.pipe, 1, mode)
    assert set(session.branches) == {n for n in tp.denoiser_attrs}  # Wan 2.2: both experts
    out = _latents(tp)
    assert out.shape == stock.shape and torch.isfinite(out).all()
    assert not torch.equal(out, stock), "STG changed nothing"
    stg_ext.remove_stg(tp.pipe)
    assert torch.equal(_latents(tp), stock)
    _no_hooks(tp)


def _perturbed_passes(tp, **kwargs) -> Dict[str, int]:
    """How many perturbed passes each denoiser ran in one sampling run."""
    counts = {}
    session = stg_ext.apply_stg(tp.pipe, 1, "attention", **kwargs)
    for name, branch in session.branches.items():
        counts[name] = 0
        original = branch.run

        def run(*args, _name=name, _original=original, **kw):
            counts[_name] += 1
            return _original(*args, **kw)
        branch.run = run
    try:
        _latents(tp, steps=4)
    finally:
        stg_ext.remove_stg(tp.pipe)
    return counts


def test_wan22_both_experts_get_stg(pipelines):
    # 4 steps at shift 3 and boundary 0.8: t = 1000, 858 (high-noise expert), 602, 9 (low-noise expert).
    tp = pipelines("wan22")
    assert _perturbed_passes(tp) == {"transformer": 2, "transformer_2": 2}
    assert _perturbed_passes(tp, start=0.5) == {"transformer": 0, "transformer_2": 2}
    assert _perturbed_passes(tp, stop=0.5) == {"transformer": 2, "transformer_2": 0}


# --- against the independent reference ---------------------------------------------------------------------------

def _refs(test_cls) -> Dict[str, Any]:
    return guided._references(test_cls)


WAN_NEG = {"encoder_hidden_states": "negative_prompt_embeds"}
REFERENCE_FAMILIES = {
    "wan22": guided.Family("wan22", test_wan.TestWanT2V, "separate", None, negative=WAN_NEG),
    "skyreels_v2": guided.Family("skyreels_v2", test_wan.TestSkyReelsV2DiffusionForcing, "separate", None,
                                 negative=WAN_NEG),
    "ltx_i2v": guided.Family("ltx_i2v", test_ltx.TestLTXVideo, "batched", None),
    "allegro": guided.Family("allegro", test_allegro.TestAllegroRoPE, "batched", None),
    "easyanimate": guided.Family("easyanimate", test_easyanimate.TestEasyAnimate, "batched", None),
}


def _reference(tp, fam, gd: Guidance, cfg_on=True, scales: Dict[str, float] = None, **overrides) -> torch.Tensor:
    """_reference's sampler on every denoiser of the pipeline (one step counter for all: Wan 2.2's experts take
    turns); scales: denoiser -> its CFG scale (default: the call's guidance_scale)."""
    kw = tp.call_kwargs(steps=STEPS, cfg=cfg_on, **overrides)
    refs = _refs(fam.tests)
    counter = [0]
    samplers = []
    try:
        for name in tp.denoiser_attrs:
            g = (scales or {}).get(name, kw["guidance_scale"])
            samplers.append(ReferenceSampler(
                getattr(tp.pipe, name), gd, STEPS, fam.convention,
                cfg_scale=(lambda step, g=g: g) if cfg_on else (lambda step: None),
                perturb=lambda m, mode, layer: refs[mode](m, layer),
                negative=guided._swap(fam.negative, kw) if fam.negative else None, counter=counter))
        return _quiet(lambda: tp.pipe(**kw).frames)
    finally:
        for sampler in samplers:
            sampler.remove()


REF_CASES = [("residual", 0.0, 0.0), ("attention", 0.7, 0.34)]


@pytest.mark.parametrize("mode,rescale,start", REF_CASES, ids=[f"{m}-r{r}-s{s}" for m, r, s in REF_CASES])
@pytest.mark.parametrize("family", sorted(REFERENCE_FAMILIES))
def test_matches_reference(pipelines, family, mode, rescale, start):
    tp, fam = pipelines(family), REFERENCE_FAMILIES[family]
    stock = _latents(tp)
    gd = Guidance(layer=1, modes=(mode,), scales=(1.0,), rescale=rescale, start=start)
    with stg_ext.apply_stg(tp.pipe, 1, mode, rescale=rescale, start=start):
        out = _latents(tp)
    guided._check(out, _reference(tp, fam, gd), stock)


def test_wan22_second_expert_scale(pipelines):
    # guidance_scale_2 (the low-noise expert's CFG scale) is read from the loop's current_guidance_scale.
    tp, fam = pipelines("wan22"), REFERENCE_FAMILIES["wan22"]
    stock = _latents(tp, guidance_scale_2=2.0)
    gd = Guidance(layer=2, modes=("residual",), scales=(1.5,), rescale=0.7)
    with stg_ext.apply_stg(tp.pipe, 2, "residual", scale=1.5, rescale=0.7):
        out = _latents(tp, guidance_scale_2=2.0)
    ref = _reference(tp, fam, gd, scales={"transformer": CFG_SCALE, "transformer_2": 2.0}, guidance_scale_2=2.0)
    guided._check(out, ref, stock)


@pytest.mark.parametrize("family", ["wan22", "allegro"])
def test_cfg_off_is_stg_alone(pipelines, family):
    tp, fam = pipelines(family), REFERENCE_FAMILIES[family]
    stock = _latents(tp, cfg=False)
    gd = Guidance(layer=1, modes=("attention",), scales=(1.5,), rescale=0.7)
    with stg_ext.apply_stg(tp.pipe, 1, "attention", scale=1.5, rescale=0.7):
        out = _latents(tp, cfg=False)
    guided._check(out, _reference(tp, fam, gd, cfg_on=False), stock)


def test_easyanimate_pipeline_guidance_rescale(pipelines):
    tp, fam = pipelines("easyanimate"), REFERENCE_FAMILIES["easyanimate"]
    stock = _latents(tp, guidance_rescale=0.5)
    gd = Guidance(layer=1, modes=("attention",), scales=(1.0,), rescale=0.7, guidance_rescale=0.5)
    with stg_ext.apply_stg(tp.pipe, 1, "attention", rescale=0.7):
        out = _latents(tp, guidance_rescale=0.5)
    guided._check(out, _reference(tp, fam, gd, guidance_rescale=0.5), stock)
    with stg_ext.apply_stg(tp.pipe, 1, "attention", scale=0.0):
        assert torch.equal(_latents(tp, guidance_rescale=0.5), stock)


# --- per-step sequences --------------------------------------------------------------------------------------------

PER_STEP = dict(scale=[1.0, 0.0, 2.0], rescale=[0.7, 0.0, 0.3], layer=[1, 2, 0])


@pytest.mark.parametrize("family", ["ltx", "wan"])
def test_per_step_sequences_match_reference(pipelines, family):
    tp, fam = pipelines(family), guided.FAMILIES[family]
    stock = _latents(tp)
    gd = Guidance(layer=1, modes=("residual",), scales=(1.0,), step_layers=PER_STEP["layer"],
                  step_scales=[(s,) for s in PER_STEP["scale"]], step_rescales=PER_STEP["rescale"])
    with stg_ext.apply_stg(tp.pipe, stg_ext.per_step(PER_STEP["layer"]), "residual", scale=PER_STEP["scale"],
                           rescale=PER_STEP["rescale"]):
        out = _latents(tp)
    guided._check(out, guided._reference(tp, fam, gd), stock)


@pytest.mark.parametrize("option", ["scale", "rescale", "layer"])
def test_per_step_length_must_be_n(pipelines, option):
    tp = pipelines("wan")
    value = PER_STEP[option][:2]
    kwargs = {"layer": stg_ext.per_step(value)} if option == "layer" else {"layer": 1, option: value}
    with stg_ext.apply_stg(tp.pipe, mode="attention", **kwargs):
        with pytest.raises(ValueError, match=f"per-step {option} sequence has 2 entries but the pipeline runs 3 steps"):
            _latents(tp)
        _latents(tp, steps=2)  # the same settings fit a 2-step run


# --- errors ---------------------------------------------------------------------------------------------------------

def test_ltx2_names_its_own_stg(pipelines):
    tp = pipelines("ltx2")
    with pytest.raises(TypeError, match="LTX2Pipeline.*stg_scale=.*spatio_temporal_guidance_blocks"):
        stg_ext.apply_stg(tp.pipe, 1, "attention")
    assert not hasattr(tp.pipe, "_stg_ext_session")
    assert getattr(tp.pipe.transformer, "_diffusers_hook", None) is None


def test_unknown_pipeline_names_the_supported_ones():
    class MyVideoPipeline:
        components = {}

    with pytest.raises(TypeError, match=r"MyVideoPipeline is not a supported pipeline\. Supported: .*LTXPipeline.*"
                                        r"WanPipeline.*apply_stg\(pipe\.transformer, layer, mode, cfg_scale="):
        stg_ext.apply_stg(MyVideoPipeline(), 1, "attention")
    with pytest.raises(TypeError, match="neither a diffusers pipeline nor a denoiser"):
        stg_ext.apply_stg(object(), 1, "attention")


@pytest.mark.parametrize("layer,mode,error,match", [
    (7, "attention", IndexError, r"layer 7 is out of range for WanTransformer3DModel, which has 3 layers: valid "
                                 r"indices are 0\.\.2"),
    ("blocks.9", "attention", ValueError, r"'blocks\.9' is not a layer of WanTransformer3DModel; .*'blocks\.0'"),
    (1.5, "attention", TypeError, "layer must be an index, a module path, a sequence of those, or "
                                  r"stg_ext\.per_step"),
    (1, "bogus", ValueError, "mode 'bogus' is not available for WanTransformer3DModel; valid modes: 'attention', "
                             "'residual'"),
    (1, ("spatial", "temporal"), ValueError, "mode 'spatial' is not available.*valid modes"),
    (1, 3, TypeError, "mode must be a mode name or a tuple of mode names"),
])
def test_bad_layer_or_mode_names_what_is_valid(pipelines, layer, mode, error, match):
    tp = pipelines("wan")
    scale = (1.0, 1.0) if isinstance(mode, tuple) else 1.0
    with pytest.raises(error, match=match):
        stg_ext.apply_stg(tp.pipe, layer, mode, scale=scale)
    _no_hooks(tp)  # nothing left behind by the failed apply


def test_bad_guidance_options_are_clear(pipelines):
    tp = pipelines("wan")
    for kwargs, match in [(dict(scale="high"), "scale must be a float"),
                          (dict(mode=("residual", "attention"), scale=1.0), r"scale must be a tuple of 2 floats"),
                          (dict(rescale=1.5), r"rescale must be in \[0, 1\]"),
                          (dict(start=0.8, stop=0.2), "start .* must not be after stop")]:
        with pytest.raises(ValueError, match=match):
            stg_ext.apply_stg(tp.pipe, 1, **{"mode": "attention", **kwargs})
    with pytest.raises(TypeError, match="cfg_scale is read from the pipeline"):
        stg_ext.apply_stg(tp.pipe, 1, "attention", cfg_scale=4.5)
    _no_hooks(tp)


# --- two pipelines in one process ------------------------------------------------------------------------------------

SETTINGS = {
    # Two pipelines of the same class (they share the pipeline module's rescale_noise_cfg wrapper), two of another.
    ("ltx", 0): dict(layer=1, mode="attention", scale=1.0, rescale=0.7),
    ("ltx", 1): dict(layer=2, mode="residual", scale=2.0, rescale=0.0),
    ("wan", 0): dict(layer=0, mode="residual", scale=1.5, rescale=0.7),
    ("wan", 1): dict(layer=1, mode="attention", scale=0.5, rescale=0.0, start=0.34),
}


def _alone(pipelines) -> Dict[Any, torch.Tensor]:
    out = {}
    for (family, seed), settings in SETTINGS.items():
        tp = pipelines(family, seed)
        s = dict(settings)
        with stg_ext.apply_stg(tp.pipe, s.pop("layer"), s.pop("mode"), **s):
            out[family, seed] = _latents(tp, guidance_rescale=0.5) if family == "ltx" else _latents(tp)
    return out


def test_pipelines_do_not_interfere(pipelines):
    alone = _alone(pipelines)
    sessions = []
    for (family, seed), settings in SETTINGS.items():
        s = dict(settings)
        sessions.append(stg_ext.apply_stg(pipelines(family, seed).pipe, s.pop("layer"), s.pop("mode"), **s))
    try:
        def run(key):
            tp = pipelines(*key)
            return _latents(tp, guidance_rescale=0.5) if key[0] == "ltx" else _latents(tp)

        # Interleaved: A, B, C, D, then in reverse.
        for keys in (list(SETTINGS), list(reversed(SETTINGS))):
            for key in keys:
                assert torch.equal(run(key), alone[key]), key
        # Nested: each pipeline's step-end callback runs another pipeline (both __call__ frames on the stack).
        nested: Dict[Any, List[torch.Tensor]] = {}
        keys = list(SETTINGS)
        for outer, inner in zip(keys, keys[1:] + keys[:1]):
            def callback(pipe, i, t, kwargs, inner=inner):
                if i == 1:
                    nested.setdefault(inner, []).append(run(inner))
                return {}
            tp = pipelines(*outer)
            extra = dict(guidance_rescale=0.5) if outer[0] == "ltx" else {}
            out = _quiet(lambda: tp.pipe(**tp.call_kwargs(steps=STEPS, callback_on_step_end=callback,
                                                          **extra)).frames)
            assert torch.equal(out, alone[outer]), outer
        for key in keys:
            assert [torch.equal(x, alone[key]) for x in nested[key]] == [True], key
    finally:
        for session in sessions:
            session.remove()


def test_a_shared_denoiser_refuses_a_second_session(pipelines):
    tp = pipelines("wan")
    other = copy.copy(tp.pipe)  # a second pipeline object sharing the transformer
    with stg_ext.apply_stg(tp.pipe, 1, "attention"):
        with pytest.raises(RuntimeError, match="already carries STG guidance"):
            stg_ext.apply_stg(other, 1, "attention")
    _no_hooks(tp)


# --- offloading ------------------------------------------------------------------------------------------------------

def test_model_cpu_offload_needs_an_accelerator_or_an_explicit_device(pipelines):
    """What diffusers does on a CPU-only machine: enable_model_cpu_offload() refuses without an accelerator;
    with device="cpu" it installs accelerate's offload hooks (onload and offload are both the CPU), which is what
    the next test composes STG with."""
    if torch.cuda.is_available():
        pytest.skip("an accelerator is present")
    tp = _quiet(tiny_pipeline, "wan", vae=False)
    with pytest.raises(RuntimeError, match="requires accelerator"):
        tp.pipe.enable_model_cpu_offload()


def _count_accelerate_hook(module) -> List[int]:
    calls = [0]
    hook = module._hf_hook
    original = hook.pre_forward

    def pre_forward(m, *args, **kwargs):
        calls[0] += 1
        return original(m, *args, **kwargs)
    hook.pre_forward = pre_forward
    return calls


def _offloaded(order, **stg):
    tp = _quiet(tiny_pipeline, "wan", vae=False)
    if order == "offload_first":
        tp.pipe.enable_model_cpu_offload(device="cpu")
    session = stg_ext.apply_stg(tp.pipe, 1, "residual", **stg)
    if order == "stg_first":
        tp.pipe.enable_model_cpu_offload(device="cpu")
    return tp, session, _count_accelerate_hook(tp.pipe.transformer)


def test_model_cpu_offload(pipelines):
    """STG applied first, then the offload: accelerate wraps the guidance hook, and its re-installation after each
    call keeps it."""
    reference = pipelines("wan")
    stock = _latents(reference)
    with stg_ext.apply_stg(reference.pipe, 1, "residual"):
        with_stg = _latents(reference)
    tp, session, calls = _offloaded("stg_first")
    for _ in range(3):  # the pipeline takes its offload hooks off and puts new ones on after each call
        calls = _count_accelerate_hook(tp.pipe.transformer)
        assert torch.equal(_latents(tp), with_stg)
        assert calls[0] > 0
    tp, session, calls = _offloaded("stg_first", scale=0.0)
    assert torch.equal(_latents(tp), stock)


def test_model_cpu_offload_then_stg(pipelines):
    reference = pipelines("wan")
    with stg_ext.apply_stg(reference.pipe, 1, "residual"):
        with_stg = _latents(reference)
    tp, session, calls = _offloaded("offload_first")
    for _ in range(3):
        calls = _count_accelerate_hook(tp.pipe.transformer)
        assert torch.equal(_latents(tp), with_stg)
        assert calls[0] > 0


@pytest.mark.parametrize("order", ["offload_first", "stg_first"])
def test_remove_keeps_model_cpu_offload(pipelines, order):
    stock = _latents(pipelines("wan"))
    tp, session, calls = _offloaded(order)
    _latents(tp)
    session.remove()
    for _ in range(2):
        calls = _count_accelerate_hook(tp.pipe.transformer)  # the pipeline makes new hooks after each call
        assert torch.equal(_latents(tp), stock)
        assert calls[0] > 0, "the offload hook no longer runs after remove_stg"


def _group_hooks(model) -> List[Any]:
    return [(module, name) for module in model.modules()
            for name in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}) if "offload" in name]


def _count_group_hooks(model) -> List[int]:
    calls = [0]
    for module, name in _group_hooks(model):
        registry = module._diffusers_hook
        fn_ref = registry._fn_refs[registry._hook_order.index(name)]
        original = fn_ref.pre_forward

        def pre_forward(m, *args, _original=original, **kwargs):
            calls[0] += 1
            return _original(m, *args, **kwargs)
        fn_ref.pre_forward = pre_forward
    return calls


@pytest.mark.parametrize("order", ["offload_first", "stg_first"])
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload(pipelines, offload_type, order):
    reference = pipelines("wan")
    stock = _latents(reference)
    with stg_ext.apply_stg(reference.pipe, 1, "residual"):
        with_stg = _latents(reference)
    tp = _quiet(tiny_pipeline, "wan", vae=False)
    kwargs = dict(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=offload_type)
    if offload_type == "block_level":
        kwargs["num_blocks_per_group"] = 1
    if order == "offload_first":
        tp.pipe.transformer.enable_group_offload(**kwargs)
    session = stg_ext.apply_stg(tp.pipe, 1, "residual")
    if order == "stg_first":
        tp.pipe.transformer.enable_group_offload(**kwargs)
    assert torch.equal(_latents(tp), with_stg)
    session.remove()
    calls = _count_group_hooks(tp.pipe.transformer)
    assert torch.equal(_latents(tp), stock)
    assert calls[0] > 0, "the group offloading hooks no longer run after remove_stg"
    with stg_ext.apply_stg(tp.pipe, 1, "residual", scale=0.0):
        assert torch.equal(_latents(tp), stock)


# --- diffusers' caches ----------------------------------------------------------------------------------------------

FBC_THRESHOLD = 0.3  # high enough that the tiny Wan skips its remaining blocks at some calls (the output changes)
FBC_STEPS = 4


def _fbc_pipeline():
    from diffusers import FirstBlockCacheConfig

    tp = _quiet(tiny_pipeline, "wan", vae=False)
    tp.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=FBC_THRESHOLD))
    return tp


@pytest.fixture(scope="module")
def fbc_stock():
    plain = _latents(_quiet(tiny_pipeline, "wan", vae=False), steps=FBC_STEPS)
    cached = _latents(_fbc_pipeline(), steps=FBC_STEPS)
    assert not torch.equal(cached, plain), "the cache never skipped: raise FBC_THRESHOLD"
    return cached


FBC_CASES = [("attention", 0), ("attention", 1), ("attention", 2), ("residual", 1)]


@pytest.mark.parametrize("mode,layer", FBC_CASES, ids=[f"{m}-{i}" for m, i in FBC_CASES])
def test_first_block_cache(fbc_stock, mode, layer):
    """Cache enabled first, then STG: it runs (the perturbed passes bypass the cache), scale 0 is the cached stock
    run, and remove_stg leaves the cache working."""
    tp = _fbc_pipeline()
    with stg_ext.apply_stg(tp.pipe, layer, mode, scale=0.0):
        assert torch.equal(_latents(tp, steps=FBC_STEPS), fbc_stock)
    with stg_ext.apply_stg(tp.pipe, layer, mode):
        out = _latents(tp, steps=FBC_STEPS)
    assert torch.isfinite(out).all() and not torch.equal(out, fbc_stock)
    assert torch.equal(_latents(tp, steps=FBC_STEPS), fbc_stock)


# STG-R on FBC's first or last block, and the cache enabled after apply_stg: tests/guidance/caches/.


def test_first_block_cache_enabled_after_stg_survives_remove(fbc_stock):
    from diffusers import FirstBlockCacheConfig

    tp = _quiet(tiny_pipeline, "wan", vae=False)
    session = stg_ext.apply_stg(tp.pipe, 1, "attention", scale=0.0)
    tp.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=FBC_THRESHOLD))
    assert torch.equal(_latents(tp, steps=FBC_STEPS), fbc_stock)
    session.remove()
    assert torch.equal(_latents(tp, steps=FBC_STEPS), fbc_stock)


# --- the bare denoiser --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan_model():
    return tiny_wan_call()


@pytest.mark.parametrize("mode", MODES)
def test_bare_denoiser_custom_loop(wan_model, mode):
    model, x, neg, pos = wan_model
    refs = _refs(test_wan.TestWanT2V)
    weak = copy.deepcopy(model)
    refs[mode](weak, 1)
    t = torch.tensor([500.0])
    with torch.no_grad():
        u = model(x, t, neg, return_dict=False)[0]
        c = model(x, t, pos, return_dict=False)[0]
        p = weak(x, t, pos, return_dict=False)[0]
        g = 4.5
        with stg_ext.apply_stg(model, 1, mode, cfg_scale=g, scale=1.0, rescale=0.7):
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg, pos]), return_dict=False)[0]
            u2, c2 = out.chunk(2)
            f = u2 + g * (c2 - u2)  # the loop's own CFG line
        gd = Guidance(layer=1, modes=(mode,), scales=(1.0,), rescale=0.7)
        torch.testing.assert_close(u2, u, rtol=0, atol=1e-6)
        guided._check(f, formula(u, c, [p], g, gd).float(), u + g * (c - u))
        # cfg_scale=None: calls on the cond batch alone return c + s (c - p).
        with stg_ext.apply_stg(model, 1, mode, cfg_scale=None, scale=2.0):
            alone = model(x, t, pos, return_dict=False)[0]
        guided._check(alone, formula(None, c, [p], None, Guidance(layer=1, modes=(mode,), scales=(2.0,))).float(), c)
        # Per-step settings follow session.set_step; scale 0 is the stock model bit for bit.
        session = stg_ext.apply_stg(model, 1, mode, cfg_scale=None, scale=[0.0, 2.0])
        with pytest.raises(RuntimeError, match="set_step"):
            model(x, t, pos, return_dict=False)
        session.set_step(0, 2)
        assert torch.equal(model(x, t, pos, return_dict=False)[0], c)
        session.set_step(1, 2)
        torch.testing.assert_close(model(x, t, pos, return_dict=False)[0], alone, rtol=0, atol=1e-6)
        session.remove()
        assert torch.equal(model(x, t, pos, return_dict=False)[0], c)
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert "forward" not in module.__dict__ and (registry is None or not registry.hooks)
