"""World model training: the loss sees the decoder's unclamped output, the losses match plain formulas, a run is
reproducible from its seed, and the held-out monitor scores real clips as real clips."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan

from stg_ext.world import classifier as wc
from stg_ext.world import monitor
from stg_ext.world import train as W
from stg_ext.world.model import VAE_CONFIG, build_parts
from stg_ext.world.render import render
from stg_ext.world.scene import single_object_prompts, spec_for_prompt


def _tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKLWan(**dict(VAE_CONFIG, base_dim=8)).eval()


def test_reconstruct_is_decode_before_its_clamp():
    torch.set_num_threads(1)
    vae = _tiny_vae()
    z = torch.randn(1, VAE_CONFIG["z_dim"], 3, 8, 8) * 4  # large latents: some outputs leave [-1, 1]
    with torch.no_grad():
        raw = W.reconstruct(vae, z)
        ref = vae.decode(z).sample
    assert raw.shape == ref.shape
    assert (raw.abs() > 1).any()  # the case the clamp would hide from the gradient
    torch.testing.assert_close(raw.clamp(-1, 1), ref)
    # No hook is left behind on the decoder.
    assert not vae.decoder._forward_hooks


def test_reconstruction_loss_matches_plain_formulas():
    g = torch.Generator().manual_seed(0)
    rec, x = torch.randn(2, 3, 5, 6, 7, generator=g), torch.randn(2, 3, 5, 6, 7, generator=g)
    w = 1 + 4 * (torch.rand(2, 1, 5, 6, 7, generator=g) > 0.8).float()
    mse, l1, edge = W.reconstruction_loss(rec, x, w, edge_weight=1.0)
    wb = w.expand_as(x)
    assert torch.isclose(mse, ((rec - x) ** 2 * wb).sum() / wb.sum())
    assert torch.isclose(l1, ((rec - x).abs() * wb).sum() / wb.sum())
    dy = (rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    dx = (rec[..., 1:] - rec[..., :-1]) - (x[..., 1:] - x[..., :-1])
    assert torch.isclose(edge, dy.abs().mean() + dx.abs().mean())
    assert W.reconstruction_loss(rec, x, w, edge_weight=0.0)[2] == 0


def _short_run(seed):
    """A few steps of every phase on a handful of clips; returns every trained weight."""
    cfg = W.TrainConfig(seed=seed, clips=6, vae_steps=2, vae_batch=2, vae_frames=5, decoder_steps=1, steps=3,
                        batch=2, warmup=1, log_every=1)
    data = W.render_dataset(cfg.clips, cfg.seed)
    parts = build_parts(cfg.seed)
    log = W.Log(_short_run.tmp / f"loss_{seed}_{len(list(_short_run.tmp.iterdir()))}.csv",
                ["phase", "step", "loss", "mse", "l1", "smooth", "lr", "seconds"])
    quiet = lambda _msg: None  # noqa: E731
    W.train_vae(parts["vae"], data["videos"], cfg, log, quiet, masks=data["masks"])
    W.finetune_decoder(parts["vae"], data["videos"], cfg, log, quiet, masks=data["masks"])
    latents = W.encode_latents(parts["vae"], data["videos"])
    text = torch.randn(cfg.clips, 4, 64, generator=torch.Generator().manual_seed(seed))
    ema, _ = W.train_transformer(parts["transformer"], latents, text, torch.zeros(4, 64), cfg, log, quiet)
    return {**{"vae." + k: v.clone() for k, v in parts["vae"].state_dict().items()},
            **{"ema." + k: v.clone() for k, v in ema.state_dict().items()}}


def test_same_seed_same_weights(tmp_path):
    torch.set_num_threads(1)
    _short_run.tmp = tmp_path
    a, b, c = _short_run(3), _short_run(3), _short_run(4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_monitor_scores_real_clips_as_real_and_noise_near_chance():
    torch.set_num_threads(1)
    clf = wc.load(wc.CLASSIFIER_PATH)
    prompts = monitor.monitor_prompts(24)
    assert {p.prompt for p in prompts} <= {p.prompt for p in single_object_prompts("sweep")}
    real = torch.stack([torch.from_numpy(render(spec_for_prompt(p, 123 + i)).video).permute(3, 0, 1, 2)
                        for i, p in enumerate(prompts)])
    assert monitor.adherence(clf, real, prompts)["all"] >= 0.85
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0))
    assert monitor.adherence(clf, noise, prompts)["all"] <= 0.2
    # quantized: 8-bit levels, channels first.
    q = monitor.quantized(real.permute(0, 2, 3, 4, 1).numpy())
    assert q.shape == real.shape and torch.allclose(q, real, atol=0.5 / 255)
