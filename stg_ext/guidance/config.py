"""What the user asks of guided sampling (STG_SPEC sections 2 and 4), checked once and resolved per step.

    STGConfig(layer=34, mode="residual", scale=1.0, rescale=0.7, start=0.0, stop=0.8)

- `mode` is one mode or a tuple of modes: each mode is one perturbed pass with its own scale (factorized
  guidance, Algorithm 2: `mode=("spatial", "temporal"), scale=(w1, w2)`).
- `layer`, `scale` and `rescale` may also be per-step sequences of length N (LTX-Video's configs do that);
  for a tuple of modes, a per-step scale is a sequence of tuples.
- The window: STG is active at step i of N when `start*N <= i < stop*N`.
- `strategy`: how the perturbed branch is scheduled (STG_SPEC section 5): "sequential" (default) runs it as its
  own pass that starts at the first perturbed block from the cond pass's activations; "naive" runs the full
  third pass, as every public implementation does (kept for comparison and benchmarks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Optional, Sequence, Tuple, Union

from ..weak.model import LayerSpec

#: How the perturbed branch is scheduled (STG_SPEC section 5; branch.py).
STRATEGIES = ("sequential", "batched", "naive")
#: Where the perturbation goes: "cond" (STG: a perturbed pass on the cond inputs, f = u + g (c - u) + s (c - p)) or
#: "uncond" (the cheap variant of WanVideoSLG / SkipLayerGuidanceDiTSimple: the uncond pass runs perturbed,
#: f = u_p + g (c - u_p); no extra pass).
PLACEMENTS = ("cond", "uncond")


@dataclass(frozen=True)
class StepSettings:
    """What one active step runs: the layer spec, one scale per mode, the rescale factor."""

    layer: LayerSpec
    scales: Tuple[float, ...]
    rescale: float
    fresh: bool = True  # run the perturbed pass (else, with `every` > 1, reuse the last step's c - p)

    @property
    def is_noop(self) -> bool:
        # STG_SPEC section 2: all scales 0 and rescale 0 is the stock pipeline, with no perturbed pass at all.
        return self.rescale == 0.0 and all(s == 0.0 for s in self.scales)


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _is_layer_item(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool))


@dataclass
class STGConfig:
    layer: Any
    mode: Union[str, Tuple[str, ...]] = "attention"
    scale: Any = 1.0
    rescale: Any = 0.0
    start: float = 0.0
    stop: float = 1.0
    orthogonalize: bool = False
    strategy: str = "sequential"
    placement: str = "cond"
    every: int = 1

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"stg_ext: unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if isinstance(self.mode, str):
            self.modes: Tuple[str, ...] = (self.mode,)
        elif isinstance(self.mode, (tuple, list)) and self.mode and all(isinstance(m, str) for m in self.mode):
            self.modes = tuple(self.mode)
        else:
            raise TypeError(f"stg_ext: mode must be a mode name or a tuple of mode names, got {self.mode!r}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"stg_ext: mode {self.mode!r} repeats a mode")
        for name in ("start", "stop"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"stg_ext: {name} must be a fraction of the steps in [0, 1], got {value!r}")
        if self.start > self.stop:
            raise ValueError(f"stg_ext: start ({self.start}) must not be after stop ({self.stop})")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"stg_ext: unknown placement {self.placement!r}; valid: {', '.join(PLACEMENTS)}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"stg_ext: every must be an integer >= 1 (the perturbed branch runs on every k-th step "
                             f"of the window), got {self.every!r}")
        if self.placement == "uncond":
            if len(self.modes) != 1:
                raise ValueError("stg_ext: placement='uncond' perturbs the uncond pass with one mode; got modes "
                                 f"{self.modes}")
            if self.rescale != 0.0 or self.every != 1:
                raise ValueError("stg_ext: placement='uncond' has no combination step of its own (the pipeline's CFG "
                                 "line combines c with the perturbed u): rescale and every apply to placement='cond' "
                                 "only")
        if self.orthogonalize and len(self.modes) != 2:
            raise ValueError("stg_ext: orthogonalize=True needs two modes, e.g. mode=('spatial', 'temporal')")
        self._per_step_scale = self._check_scale(self.scale)
        self._per_step_rescale = self._check_rescale(self.rescale)
        self._per_step_layer = self._check_layer(self.layer)

    # --- validation ----------------------------------------------------------------------------------

    def _scale_item(self, value: Any, where: str) -> Tuple[float, ...]:
        n = len(self.modes)
        if n == 1 and _is_real(value):
            return (float(value),)
        if isinstance(value, (tuple, list)) and len(value) == n and all(_is_real(v) for v in value):
            return tuple(float(v) for v in value)
        need = "a float" if n == 1 else f"a tuple of {n} floats (one per mode {self.modes})"
        raise ValueError(f"stg_ext: scale{where} must be {need}, got {value!r}")

    def _check_scale(self, scale: Any) -> bool:
        try:
            self._scale_item(scale, "")
            return False
        except ValueError:
            if not isinstance(scale, (tuple, list)) or not scale:
                raise
        for i, item in enumerate(scale):
            self._scale_item(item, f"[{i}] (a per-step sequence)")
        return True

    def _check_rescale(self, rescale: Any) -> bool:
        values = list(rescale) if isinstance(rescale, (tuple, list)) else [rescale]
        if not values:
            raise ValueError("stg_ext: rescale must be a float in [0, 1] or a non-empty per-step sequence")
        for r in values:
            if not _is_real(r) or not 0.0 <= r <= 1.0:
                raise ValueError(f"stg_ext: rescale must be in [0, 1] (or a per-step sequence of such), got {r!r}")
        return isinstance(rescale, (tuple, list))

    def _check_layer(self, layer: Any) -> bool:
        """A layer spec is an index, a path, or a sequence of those (several layers at once); a per-step
        layer schedule is a sequence whose items are themselves specs, given as `STGConfig.per_step(...)`."""
        if isinstance(layer, PerStep):
            for item in layer.values:
                self._check_layer(item)
            return True
        if _is_layer_item(layer):
            return False
        if isinstance(layer, (tuple, list)) and layer and all(_is_layer_item(x) for x in layer):
            return False
        raise TypeError(f"stg_ext: layer must be an index, a module path, a sequence of those, or "
                        f"stg_ext.per_step([...]) for one spec per step; got {layer!r}")

    # --- per step ------------------------------------------------------------------------------------

    @property
    def structure(self) -> Tuple:
        """What the installed hooks depend on (modes, layers, strategy): a config with the same structure can
        replace this one on an installed session without touching the model (so compiled code stays valid)."""
        return (self.modes, tuple(map(repr, self.all_layers())), self.strategy, self.placement)

    @property
    def has_per_step(self) -> bool:
        """True when scale, rescale or layer is a per-step sequence."""
        return self._per_step_scale or self._per_step_rescale or self._per_step_layer

    def check_steps(self, n_steps: int) -> None:
        """Per-step sequences must have one entry per step of the sampling run."""
        for name, per_step in (("scale", self._per_step_scale), ("rescale", self._per_step_rescale),
                               ("layer", self._per_step_layer)):
            if per_step:
                value = getattr(self, name)
                length = len(value.values if isinstance(value, PerStep) else value)
                if length != n_steps:
                    raise ValueError(f"stg_ext: the per-step {name} sequence has {length} entries but the pipeline "
                                     f"runs {n_steps} steps; give one entry per step")

    def active(self, i: int, n_steps: int) -> bool:
        return self.start * n_steps <= i < self.stop * n_steps

    def at(self, i: int, n_steps: int) -> Optional[StepSettings]:
        """The settings of step i of n_steps, or None outside the window."""
        if not self.active(i, n_steps):
            return None
        scale = self.scale[i] if self._per_step_scale else self.scale
        rescale = self.rescale[i] if self._per_step_rescale else self.rescale
        layer = self.layer.values[i] if self._per_step_layer else self.layer
        first = math.ceil(self.start * n_steps)  # the window's first step
        return StepSettings(layer, self._scale_item(scale, ""), float(rescale), fresh=(i - first) % self.every == 0)

    def idle_layer(self, i: int, n_steps: int) -> LayerSpec:
        """The layer spec of step i whether or not STG is active there (its own per-step entry, else the one)."""
        return self.layer.values[i] if self._per_step_layer and 0 <= i < n_steps else self.all_layers()[0]

    def all_layers(self) -> Sequence[LayerSpec]:
        """Every layer spec the schedule may use."""
        return list(self.layer.values) if self._per_step_layer else [self.layer]


@dataclass(frozen=True)
class PerStep:
    """Marks a per-step layer schedule: `layer=stg_ext.per_step([34, 34, 30, ...])` (a plain list of indices
    already means several layers perturbed together)."""

    values: Tuple[Any, ...]

    def __init__(self, values: Sequence[Any]):
        if not isinstance(values, (tuple, list)) or not values:
            raise TypeError("stg_ext.per_step takes a non-empty sequence with one layer spec per step")
        object.__setattr__(self, "values", tuple(values))


def per_step(values: Sequence[Any]) -> PerStep:
    return PerStep(values)
