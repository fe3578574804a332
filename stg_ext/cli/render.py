"""One sampling run of a loaded pipeline, plain (CFG) or with STG applied, timed, as uint8 frames."""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Optional

import numpy as np
import torch

import stg_ext
from .errors import CLIError, UsageError, one_line
from .video import to_uint8_frames

MODE_NAMES = {"attention": "STG-A", "residual": "STG-R", "spatial": "STG-A spatial", "temporal": "STG-A temporal"}


@dataclass(frozen=True)
class STGSettings:
    """The arguments of stg_ext.apply_stg(pipe, layer, mode, scale=, rescale=, start=, stop=)."""

    layer: Any
    mode: Any
    scale: Any = 1.0
    rescale: float = 0.0
    start: float = 0.0
    stop: float = 1.0

    def short(self) -> str:
        """A label that fits over a small frame, e.g. "STG-R L34"."""
        modes = self.mode if isinstance(self.mode, tuple) else (self.mode,)
        tag = "STG-R" if modes == ("residual",) else "STG-A" if modes == ("attention",) else "STG"
        layer = ",".join(map(str, self.layer)) if isinstance(self.layer, tuple) else str(self.layer)
        return f"{tag} L{layer}"

    def describe(self) -> str:
        modes = self.mode if isinstance(self.mode, tuple) else (self.mode,)
        layer = ",".join(map(str, self.layer)) if isinstance(self.layer, tuple) else str(self.layer)
        scale = ",".join(f"{s:g}" for s in self.scale) if isinstance(self.scale, tuple) else f"{self.scale:g}"
        text = f"{'+'.join(MODE_NAMES.get(m, m) for m in modes)} layer {layer} scale {scale}"
        if self.rescale:
            text += f" rescale {self.rescale:g}"
        if (self.start, self.stop) != (0.0, 1.0):
            text += f" steps {self.start:g}-{self.stop:g}"
        return text


@contextmanager
def stg_applied(pipe: Any, settings: STGSettings) -> Iterator[Any]:
    """`pipe` with STG applied for the duration; a layer or mode the model lacks is a usage error."""

    layer = list(settings.layer) if isinstance(settings.layer, tuple) else settings.layer
    try:
        handle = stg_ext.apply_stg(pipe, layer, settings.mode, scale=settings.scale, rescale=settings.rescale,
                                   start=settings.start, stop=settings.stop)
    except (IndexError, ValueError) as e:
        raise UsageError(one_line(e)) from e
    except TypeError as e:  # a pipeline or denoiser stg_ext does not support
        raise CLIError(one_line(e)) from e
    try:
        yield handle
    finally:
        handle.remove()


def check_stg(pipe: Any, settings: STGSettings) -> None:
    """Fails now, before any sampling, when STG cannot be applied as asked."""
    with stg_applied(pipe, settings):
        pass


@dataclass
class Render:
    frames: np.ndarray  # (T, H, W, 3) uint8
    seconds: float  # wall time of the pipeline call (text encoding, sampling, decoding)
    denoiser_seconds: float  # of which inside the denoiser(s): where STG's extra cost is


@contextmanager
def denoiser_clock(denoisers: Iterable[torch.nn.Module]) -> Iterator[List[float]]:
    """Accumulates the wall time spent inside the denoisers' calls (STG's perturbed passes run inside them)
    into the yielded one-element list."""
    total = [0.0]
    depth = [0]
    started = [0.0]

    def before(module, args):
        if depth[0] == 0:
            started[0] = time.perf_counter()
        depth[0] += 1

    def after(module, args, output):
        depth[0] -= 1
        if depth[0] == 0:
            total[0] += time.perf_counter() - started[0]

    handles = []
    for module in denoisers:
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def render(model: Any, kwargs: dict, stg: Optional[STGSettings] = None, *, desc: Optional[str] = None,
           progress: Optional[bool] = None, leave: bool = True) -> Render:
    """Runs `model.pipe(**kwargs)` (with STG when `stg` is given) and returns its first video."""
    pipe = model.pipe
    show = model.progress if progress is None else progress
    # set_progress_bar_config replaces the whole configuration: always pass every key.
    pipe.set_progress_bar_config(disable=not show, desc=desc, leave=leave)
    context = stg_applied(pipe, stg) if stg is not None else nullcontext()
    with context, denoiser_clock(model.denoisers().values()) as inside:
        start = time.perf_counter()
        try:
            out = pipe(**kwargs)
        except (CLIError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise CLIError(f"{type(pipe).__name__} failed: {type(e).__name__}: {one_line(e)[:400]}") from e
        seconds = time.perf_counter() - start
    frames = out.frames if hasattr(out, "frames") else out[0]
    return Render(to_uint8_frames(frames), seconds, inside[0])
