"""apply_stg on the denoiser a stock pipeline calls, and the loop followed through diffusers' own signals
(stg_ext/guidance/callers.py, loop.py), including pipelines changed the ways diffusers might change them.

Tiny random pipelines from stg_ext.testing.tiny (CPU, fp32, latent output). "Equal" means bit for bit: the
denoiser-level and the pipeline-level patch run the same code on the same inputs.
"""
from __future__ import annotations

import inspect
import sys
import textwrap
import warnings

import diffusers
import pytest
import torch
from diffusers import DiffusionPipeline, HunyuanVideoPipeline, WanPipeline

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

SETTINGS = [dict(mode="attention", scale=1.0, rescale=0.0), dict(mode="residual", scale=1.5, rescale=0.7),
            dict(mode="attention", scale=1.0, rescale=0.7, start=0.25)]


def _run(pipe, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(**kw).frames


@pytest.mark.parametrize("family", ["wan", "mochi", "ltx", "cogvideox", "hunyuan_video", "svd", "latte", "wan22",
                                    "cosmos", "skyreels_v2"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["stg_a", "stg_r_rescale", "window"])
def test_denoiser_target_equals_pipeline_target(family, settings):
    tp = tiny_pipeline(family, vae=False)
    stock = _run(tp.pipe, tp.call_kwargs(steps=3))
    with stg_ext.apply_stg(tp.pipe, 1, **settings):
        want = _run(tp.pipe, tp.call_kwargs(steps=3))
    assert not torch.equal(want, stock)
    denoisers = [getattr(tp.pipe, name) for name in tp.denoiser_attrs]  # Wan 2.2: both experts
    handles = [stg_ext.apply_stg(d, 1, **settings) for d in denoisers]
    assert torch.equal(_run(tp.pipe, tp.call_kwargs(steps=3)), want)
    # a second run (another step count) follows its own loop
    with stg_ext.apply_stg(tp.pipe, 1, **settings):
        want4 = _run(tp.pipe, tp.call_kwargs(steps=4))
    handles = [stg_ext.apply_stg(d, 1, **settings) for d in denoisers]
    assert torch.equal(_run(tp.pipe, tp.call_kwargs(steps=4)), want4)
    for d in denoisers:
        stg_ext.remove_stg(d)
    assert torch.equal(_run(tp.pipe, tp.call_kwargs(steps=3)), stock)
    assert "set_timesteps" not in vars(tp.pipe.scheduler) and "step" not in vars(tp.pipe.scheduler)
    assert not any(hasattr(m, "_stg_ext_session") for d in denoisers for m in d.modules())
    for handle in handles:
        handle.remove()  # removing again is a no-op


def test_a_pipeline_built_after_apply_is_found_when_it_calls():
    tp = tiny_pipeline("wan", vae=False)
    with stg_ext.apply_stg(tp.pipe, 1, "attention"):
        want = _run(tp.pipe, tp.call_kwargs(steps=3))
    transformer = tp.pipe.transformer
    components = tp.pipe.components
    del tp
    with stg_ext.apply_stg(transformer, 1, "attention"):
        later = WanPipeline(**{**components, "scheduler": type(components["scheduler"]).from_config(
            components["scheduler"].config)})
        assert torch.equal(_run(later, _wan_kwargs(later)), want)


def _wan_kwargs(pipe, steps=3):
    return tiny_pipeline("wan", vae=False).call_kwargs(steps=steps)


def test_a_denoiser_outside_any_pipeline_runs_stock_with_one_warning(caplog):
    tp = tiny_pipeline("wan", vae=False)
    model = tp.pipe.transformer
    kw = dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500.0]),
              encoder_hidden_states=tp.call_kwargs()["prompt_embeds"], return_dict=False)
    want = model(**kw)[0]
    with stg_ext.apply_stg(model, 1, "attention"):
        assert torch.equal(model(**kw)[0], want)
        assert torch.equal(model(**kw)[0], want)
    assert sum("outside a denoising loop" in r.message for r in caplog.records) == 1


class MyVideoPipeline(DiffusionPipeline):
    """A pipeline family stg_ext does not know, looping like diffusers' pipelines do."""

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, latents, prompt_embeds, steps=2):
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            noise = self.transformer(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=prompt_embeds,
                                     return_dict=False)[0]
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
        return latents


def test_an_unknown_pipeline_family_is_an_error_at_its_first_call():
    tp = tiny_pipeline("wan", vae=False)
    mine = MyVideoPipeline(tp.pipe.transformer, tp.pipe.scheduler)
    with stg_ext.apply_stg(tp.pipe.transformer, 1, "attention"):
        with pytest.raises(TypeError, match="MyVideoPipeline is not a supported pipeline") as err:
            mine(torch.randn(1, 4, 3, 8, 8), tp.call_kwargs()["prompt_embeds"])
    assert "WanPipeline" in str(err.value) and "MochiPipeline" in str(err.value)


def _plain(fn):
    def inner(*args, **kwargs):  # no functools.wraps: no __wrapped__
        return fn(*args, **kwargs)
    return inner


def test_a_subclass_call_without_wrapped_is_guided():
    class Mine(WanPipeline):
        @_plain
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    tp = tiny_pipeline("wan", vae=False)
    mine = Mine(**tp.pipe.components)
    assert not hasattr(Mine.__call__, "__wrapped__")
    with stg_ext.apply_stg(tp.pipe, 1, "residual", rescale=0.7):
        want = _run(tp.pipe, tp.call_kwargs(steps=3))
    with stg_ext.apply_stg(mine, 1, "residual", rescale=0.7):
        assert torch.equal(_run(mine, tp.call_kwargs(steps=3)), want)
    with stg_ext.apply_stg(mine.transformer, 1, "residual", rescale=0.7):
        assert torch.equal(_run(mine, tp.call_kwargs(steps=3)), want)


class LoopInHelper(WanPipeline):
    """Wan with its denoising loop moved into a helper method, without the loop variable `i`."""

    @torch.no_grad()
    def __call__(self, prompt_embeds, negative_prompt_embeds, latents, num_inference_steps, guidance_scale):
        self._guidance_scale = guidance_scale
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        self._num_timesteps = len(self.scheduler.timesteps)
        return self._denoise(latents, prompt_embeds, negative_prompt_embeds)

    def _denoise(self, latents, embeds, negative):
        for t in self.scheduler.timesteps:
            timestep = t.expand(latents.shape[0])
            with self.transformer.cache_context("cond"):
                c = self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
                                     return_dict=False)[0]
            with self.transformer.cache_context("uncond"):
                u = self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=negative,
                                     return_dict=False)[0]
            latents = self.scheduler.step(u + self.guidance_scale * (c - u), t, latents, return_dict=False)[0]
        return latents


def test_the_loop_moved_into_a_helper_method():
    tp = tiny_pipeline("wan", vae=False)
    helper = LoopInHelper(**tp.pipe.components)
    kw = tp.call_kwargs(steps=3)
    latents = torch.randn(tp.latent_shape, generator=torch.Generator().manual_seed(3))
    mine = dict(prompt_embeds=kw["prompt_embeds"], negative_prompt_embeds=kw["negative_prompt_embeds"],
                latents=latents, num_inference_steps=3, guidance_scale=kw["guidance_scale"])
    stock = _run(tp.pipe, {**kw, "latents": latents})
    assert torch.equal(helper(**mine), stock)
    for settings in SETTINGS:
        with stg_ext.apply_stg(tp.pipe, 1, **settings):
            want = _run(tp.pipe, {**tp.call_kwargs(steps=3), "latents": latents})
        with stg_ext.apply_stg(helper, 1, **settings):
            assert torch.equal(helper(**mine), want)
        with stg_ext.apply_stg(helper.transformer, 1, **settings):
            assert torch.equal(helper(**mine), want)


def _renamed(cls, old, new):
    """A subclass of `cls` whose __call__ is cls's own source with the local `old` renamed to `new` (as a
    diffusers release might)."""
    source = textwrap.dedent(inspect.getsource(cls.__call__)).replace(old, new)
    namespace = dict(vars(sys.modules[cls.__module__]))
    exec(compile(source, f"<{cls.__name__} with {new}>", "exec"), namespace)
    return type(f"Renamed{cls.__name__}", (cls,), {"__call__": namespace["__call__"]})


def test_a_renamed_local_is_a_clear_error():
    tp = tiny_pipeline("hunyuan_video", vae=False)
    renamed = _renamed(HunyuanVideoPipeline, "true_cfg_scale", "real_cfg_scale")(**tp.pipe.components)

    def kw():
        out = tp.call_kwargs(steps=2)
        out["real_cfg_scale"] = out.pop("true_cfg_scale")
        return out

    stock = _run(renamed, kw())  # the renamed pipeline itself runs
    assert torch.equal(stock, _run(tp.pipe, tp.call_kwargs(steps=2)))
    for target in (renamed, renamed.transformer):
        with stg_ext.apply_stg(target, 1, "attention"):
            with pytest.raises(RuntimeError) as err:
                _run(renamed, kw())
        message = str(err.value)
        assert "RenamedHunyuanVideoPipeline" in message and "'true_cfg_scale'" in message
        assert diffusers.__version__ in message
        assert torch.equal(_run(renamed, kw()), stock)


def test_a_step_callback_that_calls_the_denoiser():
    tp = tiny_pipeline("wan", vae=False)
    embeds = tp.call_kwargs()["prompt_embeds"]
    calls = []

    def preview(pipe, i, t, kw):
        out = pipe.transformer(hidden_states=kw["latents"], timestep=t.expand(1), encoder_hidden_states=embeds,
                               return_dict=False)[0]
        calls.append(out.shape)
        return {}

    for target in ("pipe", "denoiser"):
        with stg_ext.apply_stg(tp.pipe, 1, "residual", rescale=0.7):
            want = _run(tp.pipe, tp.call_kwargs(steps=3))
        t = tp.pipe if target == "pipe" else tp.pipe.transformer
        with stg_ext.apply_stg(t, 1, "residual", rescale=0.7):
            got = _run(tp.pipe, tp.call_kwargs(steps=3, callback_on_step_end=preview,
                                               callback_on_step_end_tensor_inputs=["latents"]))
        assert torch.equal(got, want)
    assert len(calls) == 6


def test_restart_and_a_denoiser_target_compose():
    tp = tiny_pipeline("wan", vae=False)
    with stg_ext.apply_restart(tp.pipe, 300, 700, K=1, seed=0), stg_ext.apply_stg(tp.pipe, 1, "attention", stop=0.5):
        want = _run(tp.pipe, tp.call_kwargs(steps=4))
    with stg_ext.apply_stg(tp.pipe.transformer, 1, "attention", stop=0.5), \
            stg_ext.apply_restart(tp.pipe, 300, 700, K=1, seed=0):
        assert torch.equal(_run(tp.pipe, tp.call_kwargs(steps=4)), want)


def test_diffusion_forcing_steps_follow_its_progress_bar():
    # SkyReels-V2 diffusion forcing steps a copy of its scheduler per latent frame; its steps are the progress
    # bar's updates, N its step matrix's length. With ar_step=0 the matrix has one row per scheduler step.
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    tp = tiny_pipeline("skyreels_v2", vae=False)
    df = SkyReelsV2DiffusionForcingPipeline(**tp.pipe.components)
    kw = {k: v for k, v in tp.call_kwargs(steps=4).items() if k not in ("height", "width", "num_frames")}
    kw.update(prompt=None, height=16, width=16, num_frames=9, base_num_frames=9, ar_step=0)
    last = df.transformer.blocks[-1]
    runs = []
    hook = last.register_forward_pre_hook(lambda m, a: runs.append(1))
    stock = _run(df, dict(kw, generator=torch.Generator().manual_seed(0)))
    n_stock = len(runs)
    assert n_stock == 2 * df.num_timesteps and df.num_timesteps == 4
    for target in (df, df.transformer):
        runs.clear()
        with stg_ext.apply_stg(target, 1, "residual", stop=0.5, scale=[1.0, 2.0, 0.0, 0.0]):
            got = _run(df, dict(kw, generator=torch.Generator().manual_seed(0)))
        assert len(runs) - n_stock == 2  # the perturbed suffix ran at steps 0 and 1 only
        assert not torch.equal(got, stock)
    hook.remove()
