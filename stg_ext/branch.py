"""The perturbed branch of one denoiser in a guidance session.

Hooks for every (mode, layer) the schedule may use are installed once, inactive; `run` switches on the ones a
step asks for, calls the denoiser, and switches them off again. Between perturbed passes the denoiser is
the stock model (u and c are always computed unperturbed, STG_SPEC section 3).

Prefix reuse (STG_SPEC section 5): the perturbed branch equals the conditional branch up to the first perturbed
block. Inside `branch.reuse(layer, halve)`, the stock pass that computes `c` stashes what that block receives
(every argument: all streams, temb, masks, rotary tables; the cond rows only when the call is batched
`[uncond, cond]`), and each perturbed pass then lets the blocks before it return at once (their outputs are
never used) and starts that block from the stash. The model's own forward still runs its embeddings, its
block loop and its output head, so one code path serves every model the adapters describe.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from diffusers.hooks import ModelHook
from torch import nn

from .adapters import get_adapter
from .adapters.base import ModelAdapter, argument, read_signature
from .batch import cond_half
from .config import LayerSpec
from .hooks import PerturbationState, install, uninstall
from .weak import check_mode, install_layer_hooks, resolve_layers, unwrap

PREFIX_HOOK = "stg_ext.prefix"
STRATEGIES = ("sequential", "naive")


def _key(spec: LayerSpec) -> Tuple:
    return tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)


@dataclass
class PrefixState:
    """Shared by the prefix hooks of one denoiser."""

    phase: str = "off"          # "off" | "stash" (the stock pass) | "replay" (a perturbed pass)
    start: int = -1             # execution index of the first block the perturbed branch computes
    halve: bool = False         # stash the second half of the rows (batched [uncond, cond] calls)
    stash: Optional[Tuple[tuple, dict]] = None


class PrefixHook(ModelHook):
    """On every block, in execution order `index`: stash / skip / replay as the shared state says."""

    def __init__(self, adapter: ModelAdapter, state: PrefixState, index: int):
        super().__init__()
        self.adapter, self.state, self.index = adapter, state, index

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        read_signature(module)
        return module

    def new_forward(self, module: nn.Module, *args, **kwargs) -> Any:
        state, forward = self.state, self.fn_ref.original_forward
        if state.phase == "stash" and self.index == state.start:
            if state.halve:
                batch = argument(module, args, kwargs, "hidden_states").shape[0]
                state.stash = cond_half(module, self.adapter, args, kwargs, batch)
            else:
                state.stash = (args, kwargs)
        elif state.phase == "replay":
            if self.index < state.start:
                return self.adapter.skip_output(module, args, kwargs)
            if self.index == state.start:
                args, kwargs = state.stash
        return forward(*args, **kwargs)


class PerturbedBranch:
    def __init__(self, model: nn.Module, modes: Sequence[str], layer_specs: Sequence[LayerSpec],
                 strategy: str = "sequential"):
        if strategy not in STRATEGIES:
            raise ValueError(f"stg_ext: unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
        self.model = unwrap(model)
        self.adapter = get_adapter(self.model)
        for mode in modes:
            check_mode(self.model, mode)
        all_layers = self.adapter.layers(self.model)
        # Resolve every spec now: a bad layer fails at apply time, not in the middle of sampling.
        self._layers: Dict[Tuple, List[int]] = {}
        by_index = {}
        for spec in layer_specs:
            layers = resolve_layers(self.adapter, self.model, spec)
            self._layers[_key(spec)] = [lay.index for lay in layers]
            by_index.update({lay.index: lay for lay in layers})
        # Execution index of each layer's first block module (layers list their modules in execution order).
        self._first_block: Dict[int, int] = {}
        blocks: List[nn.Module] = []
        for lay in all_layers:
            self._first_block[lay.index] = len(blocks)
            blocks.extend(lay.modules)
        self._states: Dict[Tuple[str, int], PerturbationState] = {}
        self._installed: List[Tuple[nn.Module, str]] = []
        self.prefix: Optional[PrefixState] = None
        try:
            for mode in modes:
                for index, lay in sorted(by_index.items()):
                    state = PerturbationState(active=False)
                    self._states[(mode, index)] = state
                    self._installed += install_layer_hooks(self.adapter, lay, mode, state, tag=f"[{mode}:{index}]")
            if strategy == "sequential" and self.adapter.prefix_reuse:
                # Installed after the perturbation hooks, so it is the outer hook of a perturbed block: a replayed
                # call still goes through the perturbation.
                self.prefix = PrefixState()
                self._blocks = blocks
                for k, block in enumerate(blocks):
                    self._installed.append(install(block, PrefixHook(self.adapter, self.prefix, k), PREFIX_HOOK))
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

    def _foreign_block_hooks(self) -> bool:
        """Other hooks on the blocks (diffusers' caches, offloading) may keep per-block state or expect every
        block to run; prefix reuse then steps aside and the perturbed pass runs in full."""
        for block in self._blocks:
            registry = getattr(block, "_diffusers_hook", None)
            if registry is not None and any(not name.startswith("stg_ext.") for name in registry.hooks):
                return True
        return False

    @contextmanager
    def reuse(self, spec: LayerSpec, halve: bool) -> Iterator[None]:
        """Around the stock pass and the perturbed passes of one call (see the module docstring)."""
        state = self.prefix
        if state is None or self._foreign_block_hooks():
            yield
            return
        state.phase, state.halve, state.stash = "stash", halve, None
        state.start = min(self._first_block[i] for i in self._layers[_key(spec)])
        try:
            yield
        finally:
            state.phase, state.stash = "off", None

    def run(self, forward: Callable[..., Any], mode: str, spec: LayerSpec, args: tuple, kwargs: dict) -> Any:
        state = self.prefix
        replay = state is not None and state.stash is not None and state.phase != "off"
        if replay:
            state.phase = "replay"
        elif state is not None:
            state.phase = "off"  # nothing stashed (the block did not run in the stock pass): a full pass
        with self.live(mode, spec):
            return forward(*args, **kwargs)

    def remove(self) -> None:
        uninstall(self._installed)
        self._installed = []
