"""The perturbed branch of one denoiser in a guidance session.

Hooks for every (mode, layer) the schedule may use are installed once, inactive; `run` switches on the ones a
step asks for, calls the denoiser, and switches them off again. Between perturbed passes the denoiser is
the stock model (u and c are always computed unperturbed, STG_SPEC section 3).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

from torch import nn

from .adapters import get_adapter
from .config import LayerSpec
from .hooks import PerturbationState, uninstall
from .weak import check_mode, install_layer_hooks, resolve_layers, unwrap


def _key(spec: LayerSpec) -> Tuple:
    return tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)


class PerturbedBranch:
    def __init__(self, model: nn.Module, modes: Sequence[str], layer_specs: Sequence[LayerSpec]):
        self.model = unwrap(model)
        self.adapter = get_adapter(self.model)
        for mode in modes:
            check_mode(self.model, mode)
        # Resolve every spec now: a bad layer fails at apply time, not in the middle of sampling.
        self._layers: Dict[Tuple, List[int]] = {}
        by_index = {}
        for spec in layer_specs:
            layers = resolve_layers(self.adapter, self.model, spec)
            self._layers[_key(spec)] = [lay.index for lay in layers]
            by_index.update({lay.index: lay for lay in layers})
        self._states: Dict[Tuple[str, int], PerturbationState] = {}
        self._installed: List[Tuple[nn.Module, str]] = []
        try:
            for mode in modes:
                for index, lay in sorted(by_index.items()):
                    state = PerturbationState(active=False)
                    self._states[(mode, index)] = state
                    self._installed += install_layer_hooks(self.adapter, lay, mode, state, tag=f"[{mode}:{index}]")
        except Exception:
            self.remove()
            raise

    def layer_indices(self, spec: LayerSpec) -> List[int]:
        return self._layers[_key(spec)]

    @contextmanager
    def live(self, mode: str, spec: LayerSpec) -> Iterator[None]:
        states = [self._states[(mode, i)] for i in self._layers[_key(spec)]]
        for state in states:
            state.active = True
        try:
            yield
        finally:
            for state in states:
                state.active = False

    def run(self, forward: Callable[..., Any], mode: str, spec: LayerSpec, args: tuple, kwargs: dict) -> Any:
        with self.live(mode, spec):
            return forward(*args, **kwargs)

    def remove(self) -> None:
        uninstall(self._installed)
        self._installed = []
