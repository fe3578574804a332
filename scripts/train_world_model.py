#!/usr/bin/env python
"""Train the world model (stock WanPipeline parts) on stg_ext.world's train split, and save it.

    .venv/bin/python scripts/train_world_model.py --work /work/world_work/run --out stg_ext/world/model

(the TrainConfig defaults are the shipped run's; one thread.)

Phases: render the training clips; train the VAE (AutoencoderKLWan); encode every clip to latents with it
and set its latents_mean/std; fine-tune its decoder alone on whole clips (the latents do not change); encode the prompts with the frozen UMT5 encoder through
WanPipeline.encode_prompt; train the transformer by flow matching (EMA weights are the ones saved). Every
--checkpoint-every steps the EMA pipeline is saved to WORK/latest (save_pretrained) with a sample grid
(WORK/samples_<step>.png) and the loss plot, so a stopped run leaves a usable model. At the end the pipeline
goes to --out and the loss plot to --plot. `--resume` reuses WORK's trained VAE and latents (the VAE phase is
seeded on its own, so a resumed run's transformer is the one the full command would train). At every checkpoint
and at the end, --monitor-prompts held-out prompts (the sweep split) are sampled with CFG and read by the world
classifier (stg_ext.world.monitor; chance for all three of shape, color, motion: 0.7%), and real clips of the same
prompts through the trained VAE once: the figures go to loss.csv, the plot and the model's stg_ext.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from stg_ext.world import classifier as world_classifier
from stg_ext.world import monitor
from stg_ext.world import train as W
from stg_ext.world.model import CALL_DEFAULTS, assemble, build_parts
from stg_ext.world.render import render
from stg_ext.world.scene import spec_for_prompt

ROOT = Path(__file__).resolve().parent.parent


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def plot_losses(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vae = [r for r in rows if r["phase"] == "vae"]
    dec = [r for r in rows if r["phase"] == "decoder"]
    tr = [r for r in rows if r["phase"] == "transformer"]
    held = [r for r in rows if r["phase"] == "heldout"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    if vae:
        axes[0].plot([r["step"] for r in vae], [r["mse"] for r in vae], label="MSE (9-frame windows)")
        axes[0].plot([r["step"] for r in vae], [r["l1"] for r in vae], label="L1")
    if dec:
        offset = vae[-1]["step"] + 1 if vae else 0
        axes[0].plot([offset + r["step"] for r in dec], [r["mse"] for r in dec], label="MSE, decoder only")
    if vae or dec:
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=8)
    axes[0].set_title("VAE reconstruction (object pixels x5, pixels in [-1, 1])", fontsize=10)
    axes[0].set_xlabel("step")
    if tr:
        axes[1].plot([r["step"] for r in tr], [r["loss"] for r in tr], alpha=0.3, label="batch")
        axes[1].plot([r["step"] for r in tr], [r["smooth"] for r in tr], label="smoothed")
        axes[1].legend()
    axes[1].set_title("transformer flow-matching loss")
    axes[1].set_xlabel("step")
    for key in ("all", "shape", "color", "motion"):
        axes[2].plot([r["step"] for r in held], [r[key] for r in held], marker="o", label=key)
    axes[2].axhline(1 / 140, color="gray", lw=0.8, ls=":", label="chance (all)")
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize=8)
    axes[2].set_title("held-out prompt adherence of samples (EMA, CFG)", fontsize=10)
    axes[2].set_xlabel("transformer step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


SAMPLE_PROMPTS = ["a large red circle moving right on a black background",
                  "a small blue square moving up on a gray background",
                  "a large yellow triangle rotating on a checkered background",
                  "a large green cross growing on a black background"]


@torch.no_grad()
def sample_grid(pipe, path: Path, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=SAMPLE_PROMPTS, negative_prompt="", output_type="np",
               generator=torch.Generator("cpu").manual_seed(seed), **CALL_DEFAULTS).frames
    rows = [np.concatenate(list(v[::2]), axis=1) for v in out]
    img = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="folder for logs, checkpoints and samples")
    p.add_argument("--out", type=Path, default=ROOT / "stg_ext" / "world" / "model")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "world_model_loss.png")
    p.add_argument("--resume", action="store_true", help="reuse WORK/vae and WORK/latents.pt")
    p.add_argument("--no-samples", action="store_true")
    p.add_argument("--stop-after-vae", action="store_true", help="train and save the VAE (WORK/vae), then stop")
    p.add_argument("--monitor-prompts", type=int, default=32,
                   help="held-out prompts (sweep split) sampled and classified at every checkpoint")
    for f in fields(W.TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    cfg = W.TrainConfig(**{f.name: getattr(args, f.name) for f in fields(W.TrainConfig)})
    torch.set_num_threads(cfg.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(W.config_dict(cfg), indent=1))
    say(f"config {W.config_dict(cfg)}")
    log = W.Log(work / "loss.csv", ["phase", "step", "loss", "mse", "l1", "smooth", "lr", "seconds",
                                    "all", "shape", "color", "motion"])
    classifier = world_classifier.load(world_classifier.CLASSIFIER_PATH)
    watch = monitor.monitor_prompts(args.monitor_prompts)
    watch_real = torch.stack([torch.from_numpy(render(spec_for_prompt(p_, 77_000 + i)).video).permute(3, 0, 1, 2)
                              for i, p_ in enumerate(watch)])

    t0 = time.perf_counter()
    data = W.render_dataset(cfg.clips, cfg.seed)
    say(f"rendered {cfg.clips} clips {tuple(data['videos'].shape)} in {time.perf_counter() - t0:.0f}s")
    parts = build_parts(cfg.seed)
    vae_time = 0.0
    if args.resume and (work / "vae").exists() and (work / "latents.pt").exists():
        from diffusers import AutoencoderKLWan

        parts["vae"] = AutoencoderKLWan.from_pretrained(work / "vae").eval()
        latents = torch.load(work / "latents.pt")
        vae_time = 60 * json.loads((work / "vae_phase.json").read_text())["vae_minutes"]
        say("resumed the VAE and latents")
    else:
        t0 = time.perf_counter()
        W.train_vae(parts["vae"], data["videos"], cfg, log, say, masks=data["masks"])
        vae_time = time.perf_counter() - t0
        say(f"VAE trained in {vae_time / 60:.1f} min")
        t0 = time.perf_counter()
        latents = W.encode_latents(parts["vae"], data["videos"])
        mean, std = W.latent_stats(latents)
        parts["vae"].register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                                        latents_std=[round(float(v), 5) for v in std])
        say(f"latents {tuple(latents.shape)} encoded in {time.perf_counter() - t0:.0f}s; mean {mean.tolist()} "
            f"std {std.tolist()}")
        if cfg.decoder_steps:
            t0 = time.perf_counter()
            done = W.finetune_decoder(parts["vae"], data["videos"], cfg, log, say, masks=data["masks"])
            vae_time += time.perf_counter() - t0
            say(f"decoder fine-tuned {done} steps in {(time.perf_counter() - t0) / 60:.1f} min")
        parts["vae"].save_pretrained(work / "vae")
        torch.save(latents, work / "latents.pt")
        (work / "vae_phase.json").write_text(json.dumps(dict(vae_minutes=round(vae_time / 60, 2))))
    if args.stop_after_vae:
        plot_losses(log.rows, work / "loss.png")
        return 0
    vae = parts["vae"].requires_grad_(False).eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    norm = (latents - mean) / std
    with torch.no_grad():
        rec = vae.decode(latents[:32]).sample
    vae_mse = float((rec - data["videos"][:32]).pow(2).mean())
    say(f"VAE reconstruction MSE on 32 training clips: {vae_mse:.5f}")
    vae_adh = monitor.vae_adherence(vae, classifier, watch_real, watch)
    real_adh = monitor.adherence(classifier, watch_real, watch)
    log.add(phase="vae_adherence", step=0, **vae_adh)
    say(f"adherence of {len(watch)} held-out real clips: as drawn {real_adh}, through the VAE {vae_adh}")

    pipe = assemble(parts)
    pipe.set_progress_bar_config(disable=True)
    embeds = W.encode_prompts(pipe, data["prompts"])
    text = torch.stack([embeds[p_] for p_ in data["prompts"]])
    empty = embeds[""]
    say(f"{len(embeds)} distinct prompts encoded, text {tuple(text.shape)}")

    meta = dict(seed=cfg.seed, train_config=W.config_dict(cfg), vae_reconstruction_mse=vae_mse,
                vae_adherence=dict(vae_adh, prompts=len(watch), split="sweep"),
                command="scripts/train_world_model.py " + " ".join(sys.argv[1:] if argv is None else argv))

    def watch_samples(ema, step):
        pipe_ = assemble(dict(parts, transformer=ema))
        pipe_.set_progress_bar_config(disable=True)
        adh = monitor.sample_adherence(pipe_, classifier, watch)
        log.add(phase="heldout", step=step, **adh)
        return adh

    def checkpoint(ema, step):
        t = time.perf_counter()
        W.save_pipeline(parts, ema, work / "latest", dict(meta, transformer_steps=step))
        adh = watch_samples(ema, step)
        plot_losses(log.rows, work / "loss.png")
        if not args.no_samples:
            sample_grid(assemble(dict(parts, transformer=ema)), work / f"samples_{step:05d}.png")
        say(f"checkpoint at step {step} ({time.perf_counter() - t:.0f}s): held-out adherence {adh}")

    t0 = time.perf_counter()
    ema, last = W.train_transformer(parts["transformer"], norm, text, empty, cfg, log, say, checkpoint)
    tr_time = time.perf_counter() - t0
    say(f"transformer trained {last + 1} steps in {tr_time / 60:.1f} min")
    final_adh = watch_samples(ema, last + 1)
    say(f"held-out adherence of the final EMA model: {final_adh}")
    meta.update(transformer_steps=last + 1, vae_minutes=round(vae_time / 60, 2),
                transformer_minutes=round(tr_time / 60, 2), threads=cfg.threads,
                heldout_adherence=dict(final_adh, prompts=len(watch), split="sweep"),
                final_loss_smoothed=[r for r in log.rows if r["phase"] == "transformer"][-1]["smooth"])
    W.save_pipeline(parts, ema, args.out, meta)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot_losses(log.rows, args.plot)
    if not args.no_samples:
        sample_grid(assemble(dict(parts, transformer=ema)), work / "samples_final.png")
    say(f"saved {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
