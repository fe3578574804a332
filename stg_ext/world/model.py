"""The world model's parts: stock diffusers classes at sizes that train on a 2-core CPU.

- tokenizer: a T5 (sentencepiece-unigram) tokenizer whose vocabulary is built in memory from the world's words;
- text_encoder: a 2-layer UMT5 encoder (the class WanPipeline uses), frozen at its seeded random init;
- vae: AutoencoderKLWan, 2x spatial / 2x temporal compression, 8 latent channels (13 x 32 x 32 -> 7 x 16 x 16):
  a shape of 8-13 px keeps 4-6 latent pixels across, not 2-3 as at 4x. With the clamp-free, edge-weighted loss
  (train.py) real held-out clips read right after the VAE went from 17% (4x) to 42% (the two changes were not
  measured apart); shapes are still soft (shape accuracy 45%);
- transformer: WanTransformer3DModel, 8 blocks, width 128 (4 heads x 32), patch (1, 4, 4): 112 video tokens
  (7 x 4 x 4, each 8 x 8 pixels, as before: the finer latent grid does not make a step dearer);
- scheduler: FlowMatchEulerDiscreteScheduler (the transformer predicts noise - x0, as WanPipeline expects).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from .render import FRAMES, SIZE
from .scene import BACKGROUNDS, COLORS, MOTION_WORDS, SHAPES, SIZES

TEXT_LEN = 24  # tokens per prompt (the longest two-object prompt has 19 with </s>); pass max_sequence_length
Z_DIM = 8
FLOW_SHIFT = 2.0
GUIDANCE_SCALE = 5.0
STEPS = 20

VAE_CONFIG: Dict[str, Any] = dict(base_dim=16, z_dim=Z_DIM, dim_mult=[1, 2], num_res_blocks=1,
                                  temperal_downsample=[True], scale_factor_temporal=2, scale_factor_spatial=2,
                                  latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM)
TRANSFORMER_CONFIG: Dict[str, Any] = dict(patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=32,
                                          in_channels=Z_DIM, out_channels=Z_DIM, text_dim=64, freq_dim=64, ffn_dim=256,
                                          num_layers=8, rope_max_seq_len=32)
TEXT_CONFIG: Dict[str, Any] = dict(d_model=64, d_ff=128, d_kv=32, num_heads=2, num_layers=2)

# How to call the pipeline on this model (also written next to it as stg_ext.json).
CALL_DEFAULTS: Dict[str, Any] = dict(height=SIZE, width=SIZE, num_frames=FRAMES, max_sequence_length=TEXT_LEN,
                                     guidance_scale=GUIDANCE_SCALE, num_inference_steps=STEPS)


def world_words() -> List[str]:
    words = {"a", "and", "on", "background"} | set(SHAPES) | set(COLORS) | set(SIZES) | set(BACKGROUNDS)
    for phrase in MOTION_WORDS.values():
        words |= set(phrase.split())
    return sorted(words)


def tokenizer():
    """A T5 tokenizer from an in-memory vocabulary: each world word is one piece; other text falls back to
    letters (and <unk>)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in world_words()] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = TEXT_LEN
    return tok


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def build_parts(seed: int) -> Dict[str, Any]:
    """Every part at its seeded initialisation: a part's weights depend only on `seed` and its role."""
    from transformers import UMT5Config, UMT5EncoderModel

    tok = tokenizer()
    text_config = UMT5Config(vocab_size=len(tok), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                             dropout_rate=0.0, **TEXT_CONFIG)
    return dict(
        tokenizer=tok,
        text_encoder=_seeded(seed, lambda: UMT5EncoderModel(text_config)).eval().requires_grad_(False),
        vae=_seeded(seed + 1, lambda: AutoencoderKLWan(**VAE_CONFIG)),
        transformer=_seeded(seed + 2, lambda: WanTransformer3DModel(**TRANSFORMER_CONFIG)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT),
    )


def assemble(parts: Dict[str, Any]):
    return WanPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                       transformer=parts["transformer"], scheduler=parts["scheduler"])
