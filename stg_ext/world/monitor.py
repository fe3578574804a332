"""Is the world model learning? Prompt adherence of its samples on prompts it never trained on, read by the
shipped world classifier; the training script measures it at every checkpoint.

The prompts come from the "sweep" split (held out from training like "eval"), so watching them during training
leaves the eval split untouched; nothing is selected by this figure (the last checkpoint is the one shipped).
Chance is 1/4 x 1/5 x 1/7 = 0.7% for all three of shape, color and motion.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from .classifier import HEADS, WorldClassifier
from .model import CALL_DEFAULTS
from .scene import PromptSpec, single_object_prompts

SCORED = ("shape", "color", "motion")


def monitor_prompts(n: int, split: str = "sweep", seed: int = 0) -> List[PromptSpec]:
    pool = single_object_prompts(split)
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]


@torch.no_grad()
def adherence(classifier: WorldClassifier, videos: torch.Tensor, prompts: Sequence[PromptSpec]) -> Dict[str, float]:
    """videos (B, 3, T, H, W) in [0, 1], one one-object prompt each -> accuracy per head and of all three."""
    out = classifier(videos)
    ok = {k: np.array([HEADS[k][int(out[k][i].argmax())] == dict(zip(("shape", "color", "size", "motion"),
                                                                       p.objects[0]))[k]
                       for i, p in enumerate(prompts)]) for k in SCORED}
    all_ok = np.logical_and.reduce([ok[k] for k in SCORED])
    return dict(all=float(all_ok.mean()), **{k: float(v.mean()) for k, v in ok.items()})


def quantized(frames: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, 3) floats in [0, 1], as a video file stores them (8 bits) -> (B, 3, T, H, W)."""
    return torch.from_numpy(np.round(np.clip(frames, 0, 1) * 255) / 255).float().permute(0, 4, 1, 2, 3)


@torch.no_grad()
def sample_adherence(pipe, classifier: WorldClassifier, prompts: Sequence[PromptSpec], seed: int = 0,
                     batch: int = 16, **call) -> Dict[str, float]:
    """Samples each prompt once with the pipeline's own call (CALL_DEFAULTS unless overridden; CFG on) and
    scores the samples."""
    kwargs = dict(CALL_DEFAULTS, **call)
    videos = []
    for i in range(0, len(prompts), batch):
        chunk = [p.prompt for p in prompts[i:i + batch]]
        frames = pipe(prompt=chunk, negative_prompt=[""] * len(chunk), output_type="np",
                      generator=torch.Generator("cpu").manual_seed(seed + i), **kwargs).frames
        videos.append(quantized(np.asarray(frames)))
    return adherence(classifier, torch.cat(videos), prompts)


@torch.no_grad()
def vae_adherence(vae, classifier: WorldClassifier, real: torch.Tensor, prompts: Sequence[PromptSpec],
                  batch: int = 16) -> Dict[str, float]:
    """Real clips (B, 3, T, H, W) in [0, 1] through vae.encode (posterior mean) and vae.decode, scored."""
    outs = []
    for i in range(0, len(real), batch):
        y = vae.decode(vae.encode(real[i:i + batch] * 2 - 1).latent_dist.mean).sample
        outs.append(quantized(((y.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy()))
    return adherence(classifier, torch.cat(outs), prompts)


__all__ = ["monitor_prompts", "adherence", "sample_adherence", "vae_adherence", "quantized"]
