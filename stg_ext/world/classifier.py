"""A small video classifier trained on the world's real clips: the evaluator behind prompt adherence and the
Fréchet distance of `stg-ext eval` (the world's stand-in for VBench's and FVD's pretrained networks).

It reads a (3, T, 32, 32) clip in [0, 1] and predicts shape, color, size and motion; its 32-dimensional
penultimate activations are the features the Fréchet distance compares. It is trained on one-object clips of
EVERY combination (it judges held-out prompts, so it must know them; the video model never sees them), with
seeds disjoint from the reference clips the evaluation compares against (`REFERENCE_SEED_BASE`).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from .render import render
from .scene import BACKGROUNDS, COLORS, MOTIONS, SHAPES, SIZES, PromptSpec, spec_for_prompt, valid_combos

HEADS: Dict[str, tuple] = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "motion": MOTIONS}
FEATURES = 32
TRAIN_SEED_BASE = 5_000_000  # the classifier's training clips
REFERENCE_SEED_BASE = 9_000_000  # real clips the evaluation compares generated ones with (never trained on)


class WorldClassifier(nn.Module):
    def __init__(self, features: int = FEATURES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(3, 16, (3, 4, 4), stride=(1, 2, 2), padding=1), nn.ReLU(),
            nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(32, 48, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
        )
        self.project = nn.Sequential(nn.Linear(2 * 48, features), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(features, len(v)) for k, v in HEADS.items()})

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W) in [0, 1] -> (B, FEATURES)."""
        h = self.body(video * 2 - 1)
        return self.project(torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1))

    def forward(self, video: torch.Tensor) -> Dict[str, torch.Tensor]:
        f = self.features(video)
        return {k: head(f) for k, head in self.heads.items()}


def real_prompt(rng: np.random.Generator) -> PromptSpec:
    combos = valid_combos()
    s, c, m = combos[int(rng.integers(len(combos)))]

    return PromptSpec(((s, c, list(SIZES)[int(rng.integers(len(SIZES)))], m),),
                      BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


def real_batch(seeds, prompts=None) -> tuple:
    """Clips (B, 3, T, H, W) in [0, 1] and their labels, one object each."""
    videos, labels = [], {k: [] for k in HEADS}
    for i, seed in enumerate(seeds):
        prompt = prompts[i] if prompts is not None else real_prompt(np.random.default_rng([int(seed), 7]))
        clip = render(spec_for_prompt(prompt, int(seed)))
        videos.append(torch.from_numpy(clip.video).permute(3, 0, 1, 2))
        shape, color, size, motion = prompt.objects[0]
        for k, v in (("shape", shape), ("color", color), ("size", size), ("motion", motion)):
            labels[k].append(HEADS[k].index(v))
    return torch.stack(videos), {k: torch.tensor(v) for k, v in labels.items()}


def train_classifier(steps: int = 800, batch: int = 32, seed: int = 0, lr: float = 2e-3,
                     say: Callable[[str], None] = print) -> WorldClassifier:
    torch.manual_seed(seed)
    model = WorldClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    start = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        seeds = range(TRAIN_SEED_BASE + step * batch, TRAIN_SEED_BASE + (step + 1) * batch)
        x, y = real_batch(seeds)
        out = model(x)
        loss = sum(nn.functional.cross_entropy(out[k], y[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            say(f"classifier step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s")
    return model.eval()


@torch.no_grad()
def accuracy(model: WorldClassifier, n: int = 512, seed_base: int = REFERENCE_SEED_BASE + 500_000) -> Dict[str, float]:
    """Per-head accuracy on n fresh real clips (seeds never trained on)."""
    x, y = real_batch(range(seed_base, seed_base + n))
    out = model(x)
    return {k: float((out[k].argmax(1) == y[k]).float().mean()) for k in HEADS}


def save(model: WorldClassifier, path: Path, meta: Optional[dict] = None) -> None:
    torch.save({"state_dict": model.state_dict(), "meta": meta or {}}, path)


def load(path: Path) -> WorldClassifier:
    model = WorldClassifier()
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return model.eval()


CLASSIFIER_PATH = Path(__file__).resolve().parent / "classifier.pt"


def main(argv=None) -> int:
    """python -m stg_ext.world.classifier [--steps N] [--out PATH]: train the classifier and save it."""

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = train_classifier(steps=args.steps, seed=args.seed)
    acc = accuracy(model)
    meta = dict(steps=args.steps, seed=args.seed, minutes=round((time.perf_counter() - start) / 60, 2),
                heldout_accuracy=acc, command=f"python -m stg_ext.world.classifier --steps {args.steps} "
                                              f"--seed {args.seed}")
    save(model, args.out, meta)
    print(f"accuracy on 512 unseen real clips: {acc}; saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
