"""Training the world model: the VAE on rendered clips, then the transformer by flow matching on frozen latents.

Everything is drawn from one seed (clips, initialisations, batches, noise) and the steps are counted, not timed
(`time_limit_min` 0), so the same command gives the same weights on the same software and CPU with the same
thread count (`threads`, 1 by default): tests/world/test_train.py checks two short runs are equal bit for bit,
and two processes of the shipped command logged
equal losses over the 50 VAE steps compared. What can change the bits: another thread count
(a CPU matmul splits its sums by thread), another torch/diffusers version or CPU instruction set (other kernels),
or a wall-clock `time_limit_min`. `scripts/train_world_model.py` is the command line; this module holds the logic.

The VAE's loss is taken on the decoder's output before AutoencoderKLWan.decode's clamp to [-1, 1]
(`reconstruct`): a clamped pixel passes no gradient, and black (-1) is the background and most color channels.

Flow matching as WanPipeline's scheduler (FlowMatchEulerDiscreteScheduler) integrates it: for normalised
latents x0, noise n and sigma in (0, 1), x_t = (1 - sigma) x0 + sigma n, the transformer is called at
timestep 1000 sigma and regresses n - x0 (the scheduler's step is x += (sigma_next - sigma) * prediction).
Sigmas are drawn as the scheduler's shifted schedule spaces them (u uniform, sigma = shift u / (1 + (shift - 1) u)).
Prompts are replaced by the empty negative prompt's embedding with probability `cfg_dropout`, so the same
network gives the unconditional prediction CFG needs.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch

from .model import CALL_DEFAULTS, FLOW_SHIFT, TEXT_LEN, assemble, build_parts
from .render import render
from .scene import sample_spec


@dataclass
class TrainConfig:
    seed: int = 0
    clips: int = 4000  # training clips (split "train"), rendered once
    vae_steps: int = 900
    vae_batch: int = 4
    vae_lr: float = 4e-4  # 7e-4 spiked (gradient norm 57, the loss back up) on a 64-clip overfit test
    vae_kl: float = 1e-6
    vae_frames: int = 9  # train the VAE on windows of this many frames (1 + 4k; 0: whole clips)
    vae_fg_weight: float = 4.0  # extra weight of object pixels in the VAE loss (they cover ~5% of a frame)
    vae_edge: float = 1.0  # weight of the L1 loss on spatial differences (edges)
    vae_noise: float = 0.0  # decode mean + vae_noise * noise (0: the posterior mean, a plain autoencoder)
    decoder_steps: int = 100  # then the VAE decoder alone on whole clips (the encoder, hence the latents, frozen)
    decoder_lr: float = 2e-4
    decoder_stop: int = 0  # stop the decoder phase after this many steps (0: all decoder_steps)
    steps: int = 4000  # transformer steps
    batch: int = 8
    lr: float = 8e-4
    warmup: int = 100
    # EMA half-life ~140 steps. 0.999 (~700) is too slow for runs this short: the previous model's EMA after 1001
    # steps still held 0.999^800 = 45% of its step-200 weights.
    ema: float = 0.995
    cfg_dropout: float = 0.1
    checkpoint_every: int = 800
    log_every: int = 10
    threads: int = 1
    # Stop the transformer phase after this many minutes (0: no limit). A wall-clock stop makes the step count,
    # hence the weights, depend on the machine's load: the reproducible runs leave it at 0 and set `steps`.
    time_limit_min: float = 0.0
    stop_at: int = 0  # stop the transformer phase after the checkpoint of this step (0: run to the end)


def render_dataset(n: int, seed: int) -> Dict[str, object]:
    """n clips of the train split: videos (n, 3, T, H, W) in [-1, 1], object masks (n, T, H, W) and prompts."""
    videos, masks, prompts = [], [], []
    for i in range(n):
        clip = render(sample_spec("train", seed * 1_000_003 + i))
        videos.append(torch.from_numpy(clip.video).permute(3, 0, 1, 2))
        masks.append(torch.from_numpy(clip.masks.any(axis=0)))
        prompts.append(clip.prompt)
    return dict(videos=torch.stack(videos) * 2 - 1, masks=torch.stack(masks), prompts=prompts)


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class Log:
    def __init__(self, path: Path, fields: List[str]):
        self.path, self.fields = path, fields
        self.rows: List[dict] = []
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerow(fields)

    def add(self, **row) -> None:
        self.rows.append(row)
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([row.get(f, "") for f in self.fields])


@contextmanager
def decoder_outputs(vae) -> Iterator[List[torch.Tensor]]:
    """Collects what `vae.decoder` returns while `vae.decode` runs (one latent frame at a time, in order).

    AutoencoderKLWan.decode clamps its result to [-1, 1]; a clamped pixel passes no gradient, so a decoder that
    overshoots black (-1, the background and most color channels) would never be pulled back. The loss is taken on
    the decoder's own output instead: the same modules and causal cache as decode, before the clamp."""
    outs: List[torch.Tensor] = []
    handle = vae.decoder.register_forward_hook(lambda _module, _args, out: outs.append(out))
    try:
        yield outs
    finally:
        handle.remove()


def reconstruct(vae, z: torch.Tensor) -> torch.Tensor:
    """vae.decode(z) without its final clamp (see decoder_outputs), for training."""
    with decoder_outputs(vae) as outs:
        vae.decode(z)
    return torch.cat(outs, dim=2)


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor, edge_weight: float):
    """Weighted MSE, weighted L1 and L1 of the spatial differences (edges: a blurred shape loses its corners,
    which is what tells a square from a circle at this size). w: per-pixel weights (B, 1, T, H, W)."""
    mse = ((rec - x).pow(2) * w).mean() / w.mean()
    l1 = ((rec - x).abs() * w).mean() / w.mean()
    edge = rec.new_zeros(())
    if edge_weight:
        for dim in (3, 4):
            d_rec, d_x = rec.diff(dim=dim), x.diff(dim=dim)
            edge = edge + (d_rec - d_x).abs().mean()
    return mse, l1, edge


def _pixel_weights(x: torch.Tensor, masks: Optional[torch.Tensor], idx: torch.Tensor, fg_weight: float):
    w = torch.ones(x.shape[0], 1, *x.shape[2:])
    if fg_weight and masks is not None:
        w = w + fg_weight * masks[idx].unsqueeze(1).float()
    return w


def train_vae(vae, videos: torch.Tensor, cfg: TrainConfig, log: Log, say: Callable[[str], None],
              masks: Optional[torch.Tensor] = None) -> None:
    gen = torch.Generator().manual_seed(cfg.seed + 10)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    start = time.perf_counter()
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.vae_steps, cfg.vae_lr, 50)
        idx = torch.randint(len(videos), (cfg.vae_batch,), generator=gen)
        x = videos[idx]
        w = _pixel_weights(x, masks, idx, cfg.vae_fg_weight)
        if cfg.vae_frames and cfg.vae_frames < x.shape[2]:
            t0 = int(torch.randint(x.shape[2] - cfg.vae_frames + 1, (1,), generator=gen))
            x, w = x[:, :, t0:t0 + cfg.vae_frames], w[:, :, t0:t0 + cfg.vae_frames]
        post = vae.encode(x).latent_dist
        # The posterior's own std starts at 1 and the KL term is tiny: sampling it would drown the mean in noise
        # for hundreds of steps. The latents used downstream are the posterior means.
        z = post.mean + cfg.vae_noise * torch.randn(post.mean.shape, generator=gen)
        mse, l1, edge = reconstruction_loss(reconstruct(vae, z), x, w, cfg.vae_edge)
        kl = post.kl().mean() / x[0].numel()
        loss = mse + l1 + cfg.vae_edge * edge + cfg.vae_kl * kl * x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            log.add(phase="vae", step=step, loss=loss.item(), mse=mse.item(), l1=l1.item(),
                    seconds=round(time.perf_counter() - start, 1))
            if step % (cfg.log_every * 10) == 0:
                say(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f} mse {mse.item():.4f} "
                    f"{time.perf_counter() - start:.0f}s")
    vae.eval()


def finetune_decoder(vae, videos: torch.Tensor, cfg: TrainConfig, log: Log, say: Callable[[str], None],
                     masks: Optional[torch.Tensor] = None, time_limit_s: float = 0.0) -> int:
    """Trains the decoder alone on whole clips, from the frozen encoder's posterior means: the latents (and so
    the transformer trained on them) do not change, the decoding of every frame of a full clip improves (the
    first phase sees 9-frame windows). Returns the steps done (time_limit_s > 0 may stop it early)."""
    gen = torch.Generator().manual_seed(cfg.seed + 30)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    vae.train()
    start = time.perf_counter()
    step = -1
    for step in range(cfg.decoder_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.decoder_steps, cfg.decoder_lr, 20)
        idx = torch.randint(len(videos), (cfg.vae_batch,), generator=gen)
        x = videos[idx]
        w = _pixel_weights(x, masks, idx, cfg.vae_fg_weight)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        mse, l1, edge = reconstruction_loss(reconstruct(vae, z), x, w, cfg.vae_edge)
        loss = mse + l1 + cfg.vae_edge * edge
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.decoder_steps - 1:
            log.add(phase="decoder", step=step, loss=loss.item(), mse=mse.item(), l1=l1.item(),
                    seconds=round(time.perf_counter() - start, 1))
            if step % (cfg.log_every * 10) == 0:
                say(f"decoder step {step}/{cfg.decoder_steps} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s")
        if time_limit_s and time.perf_counter() - start > time_limit_s:
            break
        if cfg.decoder_stop and step + 1 >= cfg.decoder_stop:
            break
    vae.eval()
    return step + 1


@torch.no_grad()
def encode_latents(vae, videos: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Posterior means of every clip, (n, z, T', H', W'), unnormalised."""
    out = [vae.encode(videos[i:i + batch]).latent_dist.mean for i in range(0, len(videos), batch)]
    return torch.cat(out)


@torch.no_grad()
def encode_prompts(pipe, prompts: List[str]) -> Dict[str, torch.Tensor]:
    """Each distinct prompt (and "") through the pipeline's own text path, at TEXT_LEN tokens."""
    unique = sorted(set(prompts) | {""})
    embeds = {}
    for i in range(0, len(unique), 64):
        chunk = unique[i:i + 64]
        e, _ = pipe.encode_prompt(chunk, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN,
                                  device=torch.device("cpu"))
        embeds.update(zip(chunk, e))
    return embeds


def _ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def train_transformer(transformer, latents: torch.Tensor, text: torch.Tensor, empty: torch.Tensor,
                      cfg: TrainConfig, log: Log, say: Callable[[str], None],
                      checkpoint: Optional[Callable[[object, int], None]] = None):
    """latents: normalised (n, z, T', H', W'); text: (n, L, D) embeddings of each clip's prompt; empty: (L, D)."""
    gen = torch.Generator().manual_seed(cfg.seed + 20)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    transformer.train()
    start = time.perf_counter()
    smooth = None
    step = 0
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        x0 = latents[idx]
        cond = text[idx].clone()
        drop = torch.rand(cfg.batch, generator=gen) < cfg.cfg_dropout
        cond[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.rand(cfg.batch, generator=gen)
        sigma = FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=cond, return_dict=False)[0]
        loss = (pred - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        _ema_update(ema, transformer, cfg.ema if step >= cfg.warmup else 0.0)
        value = loss.item()
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
        elapsed = time.perf_counter() - start
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log.add(phase="transformer", step=step, loss=value, smooth=smooth, lr=opt.param_groups[0]["lr"],
                    seconds=round(elapsed, 1))
            if step % (cfg.log_every * 10) == 0:
                say(f"transformer step {step}/{cfg.steps} loss {value:.4f} (smoothed {smooth:.4f}) {elapsed:.0f}s")
        if checkpoint is not None and step > 0 and step % cfg.checkpoint_every == 0:
            checkpoint(ema, step)
        if cfg.stop_at and step >= cfg.stop_at:
            say(f"stopped after the checkpoint of step {step}")
            break
        if cfg.time_limit_min and elapsed > 60 * cfg.time_limit_min:
            say(f"time limit reached at step {step}")
            break
    transformer.eval()
    return ema, step


def latent_stats(latents: torch.Tensor):
    """Per-channel mean and std over every clip, frame and position (the VAE config's latents_mean/std)."""
    z = latents.transpose(0, 1).reshape(latents.shape[1], -1)
    return z.mean(dim=1), z.std(dim=1)


def save_pipeline(parts: Dict[str, object], transformer, folder: Path, meta: dict) -> Path:
    """The whole pipeline with save_pretrained, plus stg_ext.json (how to call it, how it was made)."""
    pipe = assemble(dict(parts, transformer=transformer))
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    with open(folder / "stg_ext.json", "w") as fh:
        json.dump(dict(call=CALL_DEFAULTS, **meta), fh, indent=1)
    return folder


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


__all__ = ["TrainConfig", "render_dataset", "train_vae", "encode_latents", "encode_prompts", "train_transformer",
           "latent_stats", "save_pipeline", "build_parts", "Log"]
