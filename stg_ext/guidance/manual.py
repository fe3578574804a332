"""STG on a bare denoiser for custom sampling loops: the loop state comes from the caller.

    session = stg_ext.apply_stg(transformer, layer=8, mode="attention", cfg_scale=5.0, scale=1.0)
    for i, t in enumerate(timesteps):
        session.set_step(i, len(timesteps))   # only needed for start/stop and per-step settings
        noise = transformer(torch.cat([x, x]), t, [neg_embeds, embeds])   # batch [uncond, cond]
        u, c = noise.chunk(2)
        noise = u + 5.0 * (c - u)              # your own CFG line now gives STG's f
    session.remove()

With `cfg_scale=None` the calls carry the cond batch only and return `f = c + s (c - p)` (Algorithm 1).
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .config import STGConfig
from .session import GuidanceSession, LoopView


class ManualLoop:
    def __init__(self, cfg_scale: Any, config: STGConfig):
        self.cfg_scale = cfg_scale
        self.step: Optional[int] = None
        self.n_steps: Optional[int] = None
        self.run = object()
        self.needs_steps = config.start != 0.0 or config.stop != 1.0 or config.has_per_step

    def read(self, denoiser: str, model: nn.Module) -> LoopView:
        if self.step is None:
            if self.needs_steps:
                raise RuntimeError("stg_ext: start/stop or per-step settings need the step: call "
                                   "session.set_step(i, n_steps) in your loop before each denoiser call")
            return LoopView(0, 1, self.cfg_scale, run=self.run)
        return LoopView(self.step, self.n_steps, self.cfg_scale, run=self.run)


class DenoiserSession(GuidanceSession):
    def reconfigure(self, config: STGConfig, cfg_scale: Any = None) -> bool:
        if not super().reconfigure(config):
            return False
        fresh = ManualLoop(cfg_scale, config)
        self._loop.cfg_scale, self._loop.needs_steps = fresh.cfg_scale, fresh.needs_steps
        return True

    def set_step(self, i: int, n_steps: int) -> None:
        if not 0 <= i < n_steps:
            raise ValueError(f"stg_ext: set_step needs 0 <= i < n_steps, got i={i}, n_steps={n_steps}")
        if i == 0:
            self._loop.run = object()  # a new sampling run
            self.settle_caches()  # a cache enabled since STG was applied, before this run's first call
        self._loop.step, self._loop.n_steps = i, n_steps


def apply_to_custom_loop(model: nn.Module, config: STGConfig, cfg_scale: Any) -> DenoiserSession:
    """`apply_stg(denoiser, ..., cfg_scale=...)`: the calls carry `[uncond, cond]` (or `[cond]` with
    cfg_scale=None) and the loop sets the step itself."""
    loop = ManualLoop(cfg_scale, config)
    session = DenoiserSession(model, {type(model).__name__: model}, config, loop.read)
    session._loop = loop
    return session
