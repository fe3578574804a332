"""placement='uncond' with a cache that approximates activations is refused (issue 15), whichever was installed
first: at apply_stg when the cache came first, when the run starts when it came after; the text KV cache (exact)
is not refused."""
from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TextKVCacheConfig

import stg_ext
from stg_ext.testing.tiny import tiny_pipeline

CACHES = {
    "Pyramid Attention Broadcast": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: pipe.current_timestep),
    "First Block Cache": lambda pipe: FirstBlockCacheConfig(threshold=0.3),
}


def _run(tp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pipe(**tp.call_kwargs(steps=2)).frames


@pytest.mark.parametrize("name", list(CACHES))
@pytest.mark.parametrize("order", ["cache_first", "stg_first"])
def test_uncond_placement_with_an_approximating_cache_is_refused(name, order):
    tp = tiny_pipeline("wan", vae=False)
    match = f"{name}.*placement='uncond'"
    if order == "cache_first":
        tp.pipe.transformer.enable_cache(CACHES[name](tp.pipe))
        with pytest.raises(ValueError, match=match):
            stg_ext.apply_stg(tp.pipe, 1, "residual", placement="uncond")
        return
    with stg_ext.apply_stg(tp.pipe, 1, "residual", placement="uncond"):
        tp.pipe.transformer.enable_cache(CACHES[name](tp.pipe))
        with pytest.raises(ValueError, match=match):
            _run(tp)


def test_uncond_placement_with_the_text_kv_cache_runs():
    tp = tiny_pipeline("wan", vae=False)
    with stg_ext.apply_stg(tp.pipe, 1, "residual", placement="uncond"):
        expected = _run(tp)
    tp.pipe.transformer.enable_cache(TextKVCacheConfig())
    with stg_ext.apply_stg(tp.pipe, 1, "residual", placement="uncond"):
        assert torch.equal(_run(tp), expected)
