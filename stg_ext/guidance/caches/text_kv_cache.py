"""The text KV cache: per prompt, the text keys and values of each block are computed once. diffusers 0.42 hooks only
NucleusMoE-Image blocks (no video model); on the video denoisers it installs only its denoiser-level hook, which
records which prompt embedding is passed. Values are unchanged: prefix reuse stays on."""
from .base import CacheKind

KIND = CacheKind(
    name="Text KV cache",
    config="TextKVCacheConfig",
    hooks=("text_kv_cache_transformer", "text_kv_cache_block"),
    exact=True,
    definition="exactly STG without the cache (the cache changes no value; on the video denoisers it hooks no "
               "block)",
)
