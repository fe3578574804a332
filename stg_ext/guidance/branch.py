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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..weak.adapters import get_adapter
from ..weak.adapters.base import ModelAdapter, argument, read_signature
from ..weak.batch import cond_half, map_per_sample, take
from . import caches
from .config import STRATEGIES, LayerSpec
from .stash_guard import StashVersions
from .threads import PassOwner
from ..weak.hooks import PerturbationState, install, uninstall
from ..weak.model import check_mode, install_layer_hooks, resolve_layers, unwrap

PREFIX_HOOK = "stg_ext.prefix"
JOIN_HOOK = "stg_ext.join"


def _key(spec: LayerSpec) -> Tuple:
    return tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)


@dataclass
class PrefixState:
    """Shared by the prefix hooks of one denoiser."""

    phase: str = "off"          # "off" | "stash" (the stock pass) | "replay" (a perturbed pass)
    start: int = -1             # execution index of the first block the perturbed branch computes
    halve: bool = False         # stash the second half of the rows (batched [uncond, cond] calls)
    stash: Optional[Tuple[tuple, dict]] = None
    versions: Optional[StashVersions] = None  # the stash's version counters when it was taken (eager only)
    hooks: List["PrefixHook"] = field(default_factory=list)  # every block's hook, in execution order

    def set_phase(self, phase: str) -> None:
        """Sets the phase and every block's action for it (outside any compiled region: a hook inside a compiled
        block reads its own action, one of four strings, so that identical blocks share their compiled code)."""
        self.phase, start = phase, self.start
        for k, hook in enumerate(self.hooks):
            if phase == "stash":
                hook.action = "stash" if k == start else "run"
            elif phase == "replay":
                hook.action = "skip" if k < start else "replay" if k == start else "run"
            else:
                hook.action = "run"


class _BlockHook(ModelHook):
    """A hook on block `index` (execution order) that acts as a state shared by all blocks says."""

    def __init__(self, adapter: ModelAdapter, state: Any, index: int):
        super().__init__()
        self.adapter, self.state, self.index = adapter, state, index

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        read_signature(module)  # now, not while torch.compile traces a call
        return module


class PrefixHook(_BlockHook):
    """Runs ("run"), stashes its inputs and runs ("stash"), returns at once ("skip"), or runs from the stash
    ("replay"), as its `action` says (set by PrefixState.set_phase)."""

    action = "run"

    def new_forward(self, module: nn.Module, *args, **kwargs) -> Any:
        action, forward = self.action, self.fn_ref.original_forward
        if action == "run":
            return forward(*args, **kwargs)
        if action == "skip":
            return self.adapter.skip_output(module, args, kwargs)
        state = self.state
        if action == "stash":
            if state.halve:
                batch = argument(module, args, kwargs, "hidden_states").shape[0]
                state.stash = cond_half(module, self.adapter, args, kwargs, batch)
            else:
                state.stash = (args, kwargs)
            if not torch.compiler.is_compiling():  # a version read in a compiled frame is data-dependent
                state.versions = StashVersions.take(state.stash)
            return forward(*args, **kwargs)
        if state.versions is not None and not torch.compiler.is_compiling():
            state.versions.check(self.index)
        args, kwargs = state.stash
        return forward(*args, **kwargs)


@dataclass
class JoinState:
    """strategy="batched": the perturbed samples ride along in the stock call from the first perturbed block on."""

    phase: str = "off"          # "off" | "joined" (the stock call) | "head" (the perturbed output's head pass)
    start: int = -1             # execution index of the first block the perturbed branch computes
    last: int = -1              # execution index of the last block
    halve: bool = False         # the call is batched [uncond, cond]: the perturbed samples copy the cond half
    n: int = 0                  # rows of the stock call
    extended: Optional[Dict[int, Any]] = None  # per-call tensors already widened to the joined batch, by id
    out: Any = None             # the perturbed rows of the last block's output


class JoinHook(_BlockHook):
    """On every block, in execution order `index`. In the joined stock call, block `start` receives the n stock
    rows and widens its inputs with a copy of the cond rows (the perturbed samples); later blocks receive the
    widened streams from their predecessor and get their per-call tensors (temb, text, masks) widened; the last
    block hands the stock rows back to the model and keeps the perturbed rows for the head pass, in which every
    block returns at once and the last one returns them."""

    def _widen(self, value: Any) -> Any:
        state = self.state
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == state.n:
            wide = state.extended.get(id(value))
            if wide is None or wide[0] is not value:
                rows = value[state.n // 2:] if state.halve else value
                wide = (value, torch.cat([value, rows]))
                state.extended[id(value)] = wide
            return wide[1]
        if isinstance(value, (tuple, list)):
            return type(value)(self._widen(v) for v in value)
        if isinstance(value, dict):
            return {k: self._widen(v) for k, v in value.items()}
        return value

    def new_forward(self, module: nn.Module, *args, **kwargs) -> Any:
        state, forward = self.state, self.fn_ref.original_forward
        if state.phase == "head":
            if self.index < state.last:
                return self.adapter.skip_output(module, args, kwargs)
            return state.out
        if state.phase != "joined" or self.index < state.start:
            return forward(*args, **kwargs)
        args, kwargs = map_per_sample(module, self.adapter.shared_inputs, args, kwargs, self._widen)
        out = forward(*args, **kwargs)
        if self.index == state.last:
            total = state.n + (state.n // 2 if state.halve else state.n)
            state.out = take(out, total, slice(state.n, total))
            out = take(out, total, slice(0, state.n))
        return out


class PerturbedBranch:
    def __init__(self, model: nn.Module, modes: Sequence[str], layer_specs: Sequence[LayerSpec],
                 strategy: str = "sequential"):
        if strategy not in STRATEGIES:
            raise ValueError(f"stg_ext: unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
        self.model = unwrap(model)
        self.adapter = get_adapter(self.model)
        read_signature(self.model)  # the drivers take the cond half of its calls: read now (see base._PARAMS)
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
        self.join: Optional[JoinState] = None
        self._modes = tuple(modes)
        # The caches as last scanned: a guidance session scans again where it checks them (caches.CacheScan).
        self.cache_scan = caches.CacheScan(self.model)
        self.passes = PassOwner(type(self.model).__name__)  # one thread at a time in this denoiser's passes
        try:
            for mode in modes:
                for index, lay in sorted(by_index.items()):
                    state = PerturbationState(active=False)
                    self._states[(mode, index)] = state
                    # No refusal of cache boundary blocks: the perturbed passes run with the caches bypassed.
                    self._installed += install_layer_hooks(self.adapter, lay, mode, state, tag=f"[{mode}:{index}]",
                                                           cache_boundaries=False)
            self._blocks = blocks
            # Installed after the perturbation hooks, so they are the outer hooks of a perturbed block: a replayed
            # or widened call still goes through the perturbation.
            if strategy == "batched" and self.adapter.joinable and len(modes) == 1:
                self.join = JoinState(last=len(blocks) - 1)
                for k, block in enumerate(blocks):
                    self._installed.append(install(block, JoinHook(self.adapter, self.join, k), JOIN_HOOK))
            elif strategy != "naive" and self.adapter.prefix_reuse:
                # "batched" on a model whose blocks cannot take a joined batch (or with two perturbed passes)
                # falls back to "sequential": same result, same passes.
                self.prefix = PrefixState()
                for k, block in enumerate(blocks):
                    hook = PrefixHook(self.adapter, self.prefix, k)
                    self.prefix.hooks.append(hook)
                    self._installed.append(install(block, hook, PREFIX_HOOK))
        except Exception:
            self.remove()
            raise

    @contextmanager
    def live(self, mode: str, spec: LayerSpec, rows: Optional[slice] = None) -> Iterator[None]:
        """The perturbation of `mode` at `spec` is live inside (on `rows` of each call only, if given)."""
        states = [self._states[(mode, i)] for i in self._layers[_key(spec)]]
        self.passes.enter()
        for state in states:
            state.active, state.rows = True, rows
        try:
            yield
        finally:
            for state in states:
                state.active, state.rows = False, None
            self.passes.exit()

    def _foreign_block_hooks(self) -> bool:
        """Other hooks on the blocks (diffusers' caches, offloading) may keep per-block state or expect every
        block to run; prefix reuse then steps aside and the perturbed pass runs in full. diffusers' context-parallel
        hooks (`enable_parallelism`: split a block's inputs / gather its outputs) are stateless and act the same in
        every pass: they stay (tests/distributed/test_context_parallel.py). A cache that approximates activations
        anywhere in the model (PAB's attention hooks too) makes the cond pass's activations at the perturbed block
        the cache's, not the uncached weak model's prefix: prefix reuse steps aside then as well (caches/)."""
        if self.cache_scan.approximating:
            return True
        for block in self._blocks:
            registry = getattr(block, "_diffusers_hook", None)
            if registry is not None and any(not name.startswith(("stg_ext.", "cp_input---", "cp_output---"))
                                            for name in registry.hooks):
                return True
        return False

    def _start(self, spec: LayerSpec) -> int:
        return min(self._first_block[i] for i in self._layers[_key(spec)])

    @contextmanager
    def reuse(self, spec: LayerSpec, halve: bool, n_rows: int = 0) -> Iterator[None]:
        """Around the stock pass and the perturbed passes of one call (see the module docstring); `n_rows`: the
        stock call's batch size (needed by strategy="batched")."""
        self.passes.enter()
        try:
            if self.join is not None and not self._foreign_block_hooks():
                with self._joined(spec, halve, n_rows):
                    yield
                return
            with self.idle(spec, halve):
                yield
        finally:
            self.passes.exit()

    @contextmanager
    def idle(self, spec: LayerSpec, halve: bool) -> Iterator[None]:
        """Around a stock call that no perturbed pass follows (outside the window): stashes as a guided step's
        stock pass does, so a compiled model runs the same compiled code whether the step is guided or not (the
        stash holds references to tensors the call has anyway, until it returns)."""
        state = self.prefix
        self.passes.enter()
        try:
            if state is None or self._foreign_block_hooks():
                yield
                return
            state.halve, state.stash, state.versions = halve, None, None
            state.start = self._start(spec)
            state.set_phase("stash")
            try:
                yield
            finally:
                state.set_phase("off")
                state.stash = state.versions = None
        finally:
            self.passes.exit()

    @contextmanager
    def _joined(self, spec: LayerSpec, halve: bool, n_rows: int) -> Iterator[None]:
        state = self.join
        state.phase, state.halve, state.n, state.extended, state.out = "joined", halve, n_rows, {}, None
        state.start = self._start(spec)
        total = n_rows + (n_rows // 2 if halve else n_rows)
        perturbation = [self._states[(self._modes[0], i)] for i in self._layers[_key(spec)]]
        for p in perturbation:
            p.active, p.rows = True, slice(n_rows, total)
        try:
            yield
        finally:
            for p in perturbation:
                p.active, p.rows = False, None
            state.phase, state.extended, state.out = "off", None, None

    def run(self, forward: Callable[..., Any], mode: str, spec: LayerSpec, args: tuple, kwargs: dict) -> Any:
        join = self.join
        if join is not None and join.phase != "off":
            if join.out is None:
                raise RuntimeError("stg_ext: the joined stock call did not reach the last block")
            # The perturbed rows went through every block in the stock call; only the model's head is left.
            perturbation = [self._states[(mode, i)] for i in self._layers[_key(spec)]]
            for p in perturbation:
                p.active = False
            join.phase = "head"
            return forward(*args, **kwargs)
        state = self.prefix
        replay = state is not None and state.stash is not None and state.phase != "off"
        if replay:
            state.set_phase("replay")
        elif state is not None:
            state.set_phase("off")  # nothing stashed (the block did not run in the stock pass): a full pass
        with self.live(mode, spec):
            return forward(*args, **kwargs)

    def remove(self) -> None:
        uninstall(self._installed)
        self._installed = []
