"""stg_ext.testing.tiny: every family's stock pipeline assembles offline and runs deterministically on the CPU."""
import numpy as np
import pytest
import torch

import stg_ext
from stg_ext.testing.tiny import FAMILIES, TinyPipeline, tiny_pipeline

# Pipelines that run without a VAE for latent output (the others keep it with vae=False: they encode an image or
# read vae.config even then).
VAE_OPTIONAL = {"mochi", "ltx", "cogvideox", "wan", "wan22", "skyreels_v2", "hunyuan_video", "allegro", "latte"}
TEXT_FAMILIES = ("mochi", "ltx", "cogvideox", "wan", "wan22")


from tests.weak.models.conftest import one_thread  # noqa: F401,E402  (autouse: tiny models run faster on one thread)


@pytest.fixture(scope="module")
def pipelines():
    cache = {}

    def get(family: str) -> TinyPipeline:
        if family not in cache:
            cache[family] = tiny_pipeline(family)
        return cache[family]

    return get


def run(tp: TinyPipeline, **kwargs):
    return tp.pipe(**tp.call_kwargs(**kwargs)).frames


def batch_rows(tp: TinyPipeline, **kwargs):
    """Run the pipeline; return its output and the batch size of each denoiser call."""
    rows = []

    def record(module, args, kwargs):
        rows.append(next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)).shape[0])

    hooks = [getattr(tp.pipe, attr).register_forward_pre_hook(record, with_kwargs=True) for attr in tp.denoiser_attrs]
    try:
        return run(tp, **kwargs), rows
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_deterministically_with_and_without_cfg(pipelines, family):
    tp = pipelines(family)
    outputs = {}
    for cfg in (True, False):
        out, rows = batch_rows(tp, steps=2, cfg=cfg)
        # Without CFG one conditional row per step; with CFG an unconditional one too (batched or separate).
        assert sum(rows) == (4 if cfg else 2), f"cfg={cfg}: batch rows per denoiser call {rows}"
        assert tuple(out.shape) == tp.latent_shape
        assert torch.isfinite(out).all() and out.abs().max() > 0
        assert torch.equal(out, run(tp, steps=2, cfg=cfg)), "same seed, different latents"
        outputs[cfg] = out
    assert not torch.equal(outputs[True], outputs[False]), "CFG changed nothing"
    assert not torch.equal(outputs[True], run(tp, steps=2, seed=1)), "the seed changed nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_data_matches_the_denoisers(pipelines, family):
    tp = pipelines(family)
    for attr in tp.denoiser_attrs:
        model = getattr(tp.pipe, attr)
        assert len(stg_ext.weak.adapters.get_adapter(model).layers(model)) == tp.num_layers
    assert type(tp.pipe).__module__.startswith("diffusers.pipelines."), "not the stock pipeline class"


def test_wan22_uses_both_experts(pipelines):
    tp = pipelines("wan22")
    calls = {attr: 0 for attr in tp.denoiser_attrs}
    hooks = [getattr(tp.pipe, attr).register_forward_hook(
        lambda *_, attr=attr: calls.__setitem__(attr, calls[attr] + 1)) for attr in tp.denoiser_attrs]
    try:
        for steps in (2, 3, 4):
            calls.update(dict.fromkeys(calls, 0))
            run(tp, steps=steps, cfg=False)
            assert all(calls.values()) and sum(calls.values()) == steps, (steps, calls)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("family", ["wan", "ltx", "mochi", "hunyuan_video", "allegro", "svd", "ltx2"])
def test_decodes_frames(pipelines, family):
    tp = pipelines(family)
    video = np.asarray(run(tp, steps=2, output_type="np"))
    assert video.shape == (1, tp.frames, *tp.size, 3)
    assert np.isfinite(video).all() and video.std() > 0


@pytest.mark.parametrize("family", sorted(VAE_OPTIONAL))
def test_without_vae(family):
    tp = tiny_pipeline(family, vae=False)
    assert tp.pipe.vae is None
    out = run(tp, steps=2)
    assert tuple(out.shape) == tp.latent_shape and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_text_encoder_encodes_a_prompt(family):
    tp = tiny_pipeline(family, text_encoder=True)
    kwargs = tp.call_kwargs(steps=2, prompt="a cat")
    assert not any("prompt_embeds" in key for key in kwargs)
    cat = tp.pipe(**kwargs).frames
    assert tuple(cat.shape) == tp.latent_shape and torch.isfinite(cat).all()
    assert torch.equal(cat, run(tp, steps=2, prompt="a cat"))
    assert not torch.equal(cat, run(tp, steps=2, prompt="a dog"))


def test_text_encoder_support_and_bad_names():
    for family in FAMILIES:
        if family not in TEXT_FAMILIES:
            with pytest.raises(NotImplementedError, match="wan"):
                tiny_pipeline(family, text_encoder=True)
    with pytest.raises(ValueError, match="hunyuan_video15"):
        tiny_pipeline("sora")
    with pytest.raises(ValueError, match="text_encoder=True"):
        tiny_pipeline("wan").call_kwargs(prompt="a cat")


def test_call_kwargs_are_fresh_and_overridable(pipelines):
    tp = pipelines("cogvideox")
    a, b = tp.call_kwargs(), tp.call_kwargs()
    assert a is not b and a["generator"] is not b["generator"] and torch.equal(a["prompt_embeds"], b["prompt_embeds"])
    assert not torch.equal(a["prompt_embeds"], tp.call_kwargs(seed=1)["prompt_embeds"])
    assert tp.call_kwargs(use_dynamic_cfg=True, steps=4)["use_dynamic_cfg"] is True
    dynamic = run(tp, steps=2, use_dynamic_cfg=True)
    assert torch.isfinite(dynamic).all() and not torch.equal(dynamic, run(tp, steps=2))


def test_same_seed_same_weights():
    a, b, c = tiny_pipeline("wan", vae=False), tiny_pipeline("wan", vae=False), tiny_pipeline("wan", seed=1, vae=False)
    weights = [dict(tp.pipe.transformer.state_dict()) for tp in (a, b, c)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
