"""Branch parallelism: one step's guidance branches (u, c and the perturbed passes) spread over the ranks of a
process group, every rank ending with the same `f` (`apply_stg(pipe, ..., process_group=group)`).

Every rank runs the same pipeline call with the same inputs; at each denoiser call each rank computes only its
branches, the predictions are exchanged point to point, and every rank combines the same tensors with the same
`combine` call, so all ranks get bit-identical predictions and stay in lockstep.

The split (`plan`), chosen with prefix reuse in mind (STG_SPEC section 5): the perturbed pass equals the cond pass
up to its first perturbed block, so it costs `sigma = (L - l)/L` of a pass on the rank that computes c (the stash
stays local), and a full pass, or the suffix after waiting for the cond rank to reach block l and send its
activations there (the *stash*: the block's stream inputs, hidden and encoder states), anywhere else. u goes to
rank 0, c to rank 1; each perturbed pass goes where it finishes first, costs counted in passes (ties: local, then
full, then stash: the one that sends fewer bytes). Ranks with nothing to do compute c too (it costs no time and
saves receiving it). So, with CFG:

- 2 ranks: rank 0 u (1 pass), rank 1 c + the perturbed suffix (1 + sigma): prefix reuse kept, no stash sent;
  a second perturbed pass (two modes) goes to rank 0 from the stash (1 + sigma each).
- 3 ranks: rank 2 runs the perturbed pass in full (1 pass each: a stash would arrive after the cond rank's l
  blocks, so the suffix would end no earlier, later by the transfer).
- outside the STG window only CFG's branches are spread (u | c).

`branch_placement=` forces "cond" (every perturbed pass on the cond rank), "stash" (on other ranks, from the stash) or
"full" (on other ranks, in full); benchmarks/bench_branch_parallel.py measures them.

Calling conventions:
- batched `[uncond, cond]` calls: each rank runs the rows of its branches; every rank returns `[u, c']` as the
  single-process driver does (`c' = u + (f - u)/g`, and the pipeline's own guidance_rescale sees c).
- separate calls (cond, then uncond): the u rank can only compute u in the uncond call, so the cond call returns
  a 0-dim zero on every rank (the pipeline keeps it for its CFG line) and the uncond call returns `u' = f/(1-g)`,
  which makes the pipeline's `u' + g (0 - u')` equal `f`, the same on every rank (the *deferred* protocol: all
  branches run at once). Only for pipelines whose CFG line combines the raw predictions (Wan, SkyReels-V2,
  HunyuanVideo; not Cosmos). With CFG off or at scale 1 (Wan 2.2's second expert) everything is exchanged in the
  cond call, which returns `f`.
- the deferred protocol's rounding: the pipeline's `u' - g u'` is off by about `eps (1 + |g|) |f| / |1 - g|`,
  which grows without bound as g -> 1. For `|1 - g| < SERIAL_BELOW` the *serial* protocol runs instead: the cond
  call spreads and exchanges c and the perturbed passes and returns separate_fold's `c'`; the uncond call computes
  u on one rank, exchanges it and returns separate_fold's `u'` (the single-process fold and its error bound
  `8 eps (1 + |g|) max(|u|, |c|, |p|, |f|)`). Its price: u no longer runs beside the other branches (two passes'
  time per step on two ranks). With `SERIAL_BELOW = 1/4` the deferred protocol's error stays within the same
  bound.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from diffusers.hooks import ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from ..ops import combine
from ..weak.adapters import get_adapter
from ..weak.adapters.base import ModelAdapter, argument, positional_names, read_signature
from ..weak.batch import cond_half, take_rows
from ..weak.hooks import install, uninstall
from ..weak.model import resolve_layers
from .combine_args import perturbed_arg, stg_scale_arg
from .drivers import Call, SeparateDriver
from .outputs import prediction, with_prediction
from .separate_fold import cond_return, uncond_fold

STASH_HOOK = "stg_ext.branch_stash"
PLACEMENTS = ("auto", "cond", "stash", "full")
#: Separate-call pipelines whose CFG line is `u + g (c - u)` on the denoiser's raw outputs (the deferred protocol).
DEFERRED_OK = ("WanPipeline", "WanImageToVideoPipeline", "WanVACEPipeline", "WanVideoToVideoPipeline",
               "SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline", "HunyuanVideoPipeline",
               "HunyuanVideoImageToVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline")
_TAG_STASH, _TAG_EXCHANGE = 100, 1000
#: |1 - g| below which separate calls use the serial protocol (module docstring: the deferred protocol's rounding).
SERIAL_BELOW = 0.25


# --- the split ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """One branch on one rank: kind "u", "c" or "p" (then `mode` is the index of the perturbed pass); method of a
    perturbed pass: "local" (on the cond rank, prefix reuse), "stash" (from the cond rank's activations), "full"."""

    kind: str
    mode: int = -1
    method: str = ""

    @property
    def name(self) -> str:
        return self.kind if self.kind != "p" else f"p{self.mode}"

    def cost(self, sigma: float) -> float:
        return sigma if self.kind == "p" and self.method in ("local", "stash") else 1.0


@dataclass
class Plan:
    tasks: List[List[Task]]  # per rank, in the order run
    u_rank: Optional[int]
    c_rank: int

    def owners(self, name: str) -> List[int]:
        return [r for r, ts in enumerate(self.tasks) if any(t.name == name for t in ts)]

    def stash_peers(self) -> List[int]:
        return [r for r, ts in enumerate(self.tasks) if any(t.method == "stash" for t in ts)]

    def passes(self, sigma: float) -> List[float]:
        """Forward passes per rank (a perturbed suffix counts sigma of a pass)."""
        return [sum(t.cost(sigma) for t in ts) for ts in self.tasks]


def plan(size: int, cfg: bool, n_perturbed: int, sigma: float, wait: float, placement: str = "auto",
         stash_ok: bool = True) -> Plan:
    """The branches of one call over `size` ranks. `sigma`: the perturbed suffix's share of a pass (1 without prefix
    reuse); `wait`: the share of a pass before the first perturbed block (when a stash is ready)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"stg_ext: branch_placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    tasks: List[List[Task]] = [[] for _ in range(size)]
    load = [0.0] * size
    u_rank = 0 if cfg else None
    c_rank = min(1, size - 1)
    if cfg:
        tasks[0].append(Task("u"))
        load[0] += 1.0
    tasks[c_rank].append(Task("c"))
    load[c_rank] += 1.0
    order = {"local": 0, "full": 1, "stash": 2}
    for k in range(n_perturbed):
        options = []
        if placement in ("auto", "cond") or size == 1:
            options.append((load[c_rank] + sigma, order["local"], c_rank, "local"))
        for r in range(size):
            if r == c_rank:
                continue
            if placement in ("auto", "full"):
                options.append((load[r] + 1.0, order["full"], r, "full"))
            if placement in ("auto", "stash") and stash_ok and sigma < 1.0:
                options.append((max(load[r], wait) + sigma, order["stash"], r, "stash"))
        if not options:  # "stash" where no stash can be made (no prefix reuse): the full pass
            options = [(load[r] + 1.0, order["full"], r, "full") for r in range(size) if r != c_rank]
        finish, _, r, method = min(options)
        tasks[r].append(Task("p", k, method))
        load[r] = finish
    for r in range(size):
        if not tasks[r]:
            tasks[r].append(Task("c", method="replica"))
    return Plan(tasks, u_rank, c_rank)


# --- the stash across ranks -----------------------------------------------------------------------------------

@dataclass
class StashState:
    phase: str = "off"        # "off" | "send" (the cond pass) | "recv" (a perturbed pass from the stash)
    start: int = -1           # execution index of the first block the perturbed pass computes
    peers: Tuple[int, ...] = ()  # global ranks to send to ("send") / (src,) ("recv")
    group: Any = None
    works: List[Any] = field(default_factory=list)
    keep: List[torch.Tensor] = field(default_factory=list)  # sent tensors, alive until their sends complete
    sent_bytes: int = 0
    received_bytes: int = 0


def _header(tensors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    rows = []
    for t in tensors:
        shape = list(t.shape) if t is not None else []
        rows.append([t.dim() if t is not None else -1] + shape + [0] * (8 - len(shape)))
    return torch.tensor(rows, dtype=torch.int64)


class StashHook(ModelHook):
    """On every block (execution order `index`): in "send", block `start` sends the streams it receives (the
    adapter's `block_returns`: hidden states, and encoder states for dual-stream blocks) to the peers and runs; in
    "recv", earlier blocks return at once and block `start` runs on the streams received (every other input of the
    block, temb, masks, rotary tables, is computed from the call's inputs, the same on every rank)."""

    def __init__(self, adapter: ModelAdapter, state: StashState, index: int):
        super().__init__()
        self.adapter, self.state, self.index = adapter, state, index

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        read_signature(module)
        return module

    def new_forward(self, module: nn.Module, *args, **kwargs) -> Any:
        state, forward = self.state, self.fn_ref.original_forward
        if state.phase == "send" and self.index == state.start:
            streams = [argument(module, args, kwargs, n) for n in self.adapter.block_returns]
            header = _header(streams)
            payload = [s.detach().clone().contiguous() for s in streams if s is not None]
            for peer in state.peers:
                state.works.append(dist.isend(header, dst=peer, group=state.group, tag=_TAG_STASH))
                for i, t in enumerate(payload):
                    state.works.append(dist.isend(t, dst=peer, group=state.group, tag=_TAG_STASH + 1 + i))
                    state.sent_bytes += t.numel() * t.element_size()
            state.keep += [header] + payload
        elif state.phase == "recv":
            if self.index < state.start:
                return self.adapter.skip_output(module, args, kwargs)
            if self.index == state.start:
                args, kwargs = self._received(module, args, kwargs)
        return forward(*args, **kwargs)

    def _received(self, module: nn.Module, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        state, src = self.state, self.state.peers[0]
        names = self.adapter.block_returns
        templates = [argument(module, args, kwargs, n) for n in names]
        header = torch.zeros(len(names), 9, dtype=torch.int64)
        dist.recv(header, src=src, group=state.group, tag=_TAG_STASH)
        args, kwargs = list(args), dict(kwargs)
        positional = positional_names(module)
        j = 0
        for name, template, row in zip(names, templates, header.tolist()):
            if row[0] < 0:
                continue
            t = torch.empty(row[1:1 + row[0]], dtype=template.dtype, device=template.device)
            dist.recv(t, src=src, group=state.group, tag=_TAG_STASH + 1 + j)
            state.received_bytes += t.numel() * t.element_size()
            j += 1
            i = positional.index(name) if name in positional else len(args)
            if i < len(args):
                args[i] = t
            else:
                kwargs[name] = t
        return tuple(args), kwargs


# --- the group ------------------------------------------------------------------------------------------------

@dataclass
class StepRecord:
    """What one rank did in one denoiser call (tests and benchmarks)."""

    step: int
    role: str
    tasks: Tuple[str, ...]
    passes: float
    sent_bytes: int
    received_bytes: int


class BranchGroup:
    """The process group and what every driver of the session shares."""

    def __init__(self, group: Any, placement: str):
        if placement not in PLACEMENTS:
            raise ValueError(f"stg_ext: branch_placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        if not dist.is_initialized():
            raise RuntimeError("stg_ext: process_group= needs torch.distributed initialized (init_process_group)")
        self.group = group
        self.placement = placement
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.records: List[StepRecord] = []
        self._installed: List = []
        self.stash: Dict[int, StashState] = {}  # id(model) -> its stash state
        self.blocks: Dict[int, int] = {}        # id(model) -> number of block modules

    def global_rank(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def install(self, model: nn.Module) -> None:
        adapter = get_adapter(model)
        state = StashState(group=self.group)
        blocks = [m for lay in adapter.layers(model) for m in lay.modules]
        for k, block in enumerate(blocks):
            self._installed.append(install(block, StashHook(adapter, state, k), STASH_HOOK))
        self.stash[id(model)] = state
        self.blocks[id(model)] = len(blocks)

    def remove(self) -> None:
        uninstall(self._installed)
        self._installed = []

    def exchange(self, have: Dict[str, torch.Tensor], names: Sequence[str], p: Plan, template: torch.Tensor
                 ) -> Tuple[Dict[str, torch.Tensor], int, int]:
        """Every rank ends with every tensor of `names`: each one's lowest owner sends it to the ranks without it."""
        out, works, sent, received = dict(have), [], 0, 0
        for i, name in enumerate(names):
            owners = p.owners(name)
            src = min(owners)
            for r in range(self.size):
                if r in owners:
                    continue
                if self.rank == src:
                    t = have[name].contiguous()
                    works.append(dist.isend(t, dst=self.global_rank(r), group=self.group, tag=_TAG_EXCHANGE + i))
                    sent += t.numel() * t.element_size()
                elif self.rank == r:
                    buf = torch.empty_like(template)
                    works.append(dist.irecv(buf, src=self.global_rank(src), group=self.group,
                                            tag=_TAG_EXCHANGE + i))
                    out[name] = buf
                    received += buf.numel() * buf.element_size()
        for w in works:
            w.wait()
        return out, sent, received


def _rows(call: Call) -> int:
    for name in ("hidden_states", "sample"):
        if name in call.kwargs:
            return call.kwargs[name].shape[0]
    return call.args[0].shape[0]


class _Branches:
    """Runs this rank's tasks of one call on the cond inputs `c_in` (and the uncond inputs `u_in`)."""

    def __init__(self, bg: BranchGroup, model: nn.Module, adapter: ModelAdapter):
        self.bg, self.model, self.adapter = bg, model, adapter
        self._start: Dict[Any, int] = {}

    def start(self, spec: Any) -> int:
        key = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)
        if key not in self._start:
            layers = self.adapter.layers(self.model)
            first, n = {}, 0
            for lay in layers:
                first[lay.index] = n
                n += len(lay.modules)
            self._start[key] = min(first[lay.index] for lay in resolve_layers(self.adapter, self.model, spec))
        return self._start[key]

    def plan(self, call: Call, cfg: bool) -> Tuple[Plan, float]:
        s = call.settings
        n_p = len(call.modes) if s is not None else 0
        n_blocks = self.bg.blocks[id(self.model)]
        if s is None:
            return plan(self.bg.size, cfg, 0, 1.0, 0.0, self.bg.placement), 1.0
        start = self.start(s.layer)
        reuse = call.branch.prefix is not None or call.branch.join is not None
        sigma = (n_blocks - start) / n_blocks if reuse else 1.0
        stash_ok = self.adapter.prefix_reuse and call.branch.join is None
        return plan(self.bg.size, cfg, n_p, sigma, start / n_blocks, self.bg.placement, stash_ok), sigma

    def run(self, call: Call, p: Plan, c_in: Tuple[tuple, dict], u_in: Optional[Tuple[tuple, dict]],
            mine: Sequence[Task]) -> Tuple[Dict[str, torch.Tensor], Any]:
        """Runs `mine` (tasks of this rank, in order); returns the predictions by name and one model output."""
        bg = self.bg
        have: Dict[str, torch.Tensor] = {}
        out = None
        state = bg.stash[id(self.model)]
        s = call.settings
        for task in mine:
            if task.kind == "u":
                out = call.forward(*u_in[0], **u_in[1])
                have["u"] = prediction(out)
            elif task.kind == "c":
                local = [t for t in mine if t.kind == "p" and t.method == "local"]
                peers = tuple(bg.global_rank(r) for r in p.stash_peers()) if task.method != "replica" else ()
                reuse = call.branch.reuse(s.layer, halve=False, n_rows=_rows_of(c_in)) if local else nullcontext()
                with reuse:
                    with self._stash("send", self.start(s.layer) if peers else -1, peers, state):
                        out = call.forward(*c_in[0], **c_in[1])
                    have["c"] = prediction(out)
                    for t in local:
                        with call.isolate(call.modes[t.mode]):
                            have[t.name] = prediction(call.branch.run(call.forward, call.modes[t.mode], s.layer,
                                                                      *c_in))
            elif task.kind == "p" and task.method != "local":
                mode = call.modes[task.mode]
                src = (bg.global_rank(p.c_rank),)
                with call.isolate(mode), self._stash("recv" if task.method == "stash" else "off",
                                                     self.start(s.layer), src, state):
                    o = call.branch.run(call.forward, mode, s.layer, *c_in)
                have[task.name] = prediction(o)
                out = o if out is None else out
        return have, out

    @contextmanager
    def _stash(self, phase: str, start: int, peers: Tuple[int, ...], state: StashState) -> Iterator[None]:
        if phase == "off" or start < 0 or not peers:
            yield
            return
        state.phase, state.start, state.peers = phase, start, peers
        try:
            yield
        finally:
            state.phase = "off"


def _rows_of(inputs: Tuple[tuple, dict]) -> int:
    args, kwargs = inputs
    for name in ("hidden_states", "sample"):
        if name in kwargs:
            return kwargs[name].shape[0]
    return args[0].shape[0]


def _finish_sends(state: StashState) -> None:
    for w in state.works:
        w.wait()
    state.works, state.keep = [], []


def _names(cfg: bool, n_p: int) -> List[str]:
    return (["u"] if cfg else []) + ["c"] + [f"p{k}" for k in range(n_p)]


class ParallelCFGBatchDriver:
    """Batched `[uncond, cond]` calls (or `[cond]` with CFG off), the branches spread over the group."""

    def __init__(self, bg: BranchGroup, adapter: ModelAdapter, model: nn.Module):
        self.bg, self.adapter, self.model = bg, adapter, model
        self.branches = _Branches(bg, model, adapter)
        self.last_fold: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.step = 0

    def __call__(self, call: Call) -> Any:
        bg, s = self.bg, call.settings
        cfg = call.cfg_scale is not None
        n = _rows(call)
        if cfg:
            if n % 2:
                raise RuntimeError(f"stg_ext: the pipeline's CFG is on but the denoiser got an odd batch of {n}; "
                                   "expected [uncond, cond]")
            u_in = take_rows(self.model, self.adapter.shared_inputs, call.args, call.kwargs, n, slice(0, n // 2))
            c_in = cond_half(self.model, self.adapter, call.args, call.kwargs, n)
        else:
            u_in, c_in = None, (call.args, call.kwargs)
        p, sigma = self.branches.plan(call, cfg)
        have, out = self.branches.run(call, p, c_in, u_in, p.tasks[bg.rank])
        state = bg.stash[id(self.model)]
        n_p = len(call.modes) if s is not None else 0
        names = _names(cfg, n_p)
        got, sent, received = bg.exchange(have, names, p, next(iter(have.values())))
        _finish_sends(state)
        self._record(call, p, sigma, sent, received, "cfg_batch")
        ps = [got[f"p{k}"] for k in range(n_p)]
        if not cfg:
            f = got["c"] if s is None else combine(got["c"], perturbed_arg(ps), None, stg_scale=stg_scale_arg(s.scales),
                                                   rescale=s.rescale, orthogonalize=call.orthogonalize)
            return with_prediction(out, f)
        u, c = got["u"], got["c"]
        if s is None:
            return with_prediction(out, torch.cat([u, c]))
        c_folded = combine(c, perturbed_arg(ps), u, cfg_scale=call.cfg_scale, stg_scale=stg_scale_arg(s.scales),
                           rescale=s.rescale, orthogonalize=call.orthogonalize, fold=True)
        self.last_fold = (c, c_folded)
        return with_prediction(out, torch.cat([u, c_folded]))

    def _record(self, call: Call, p: Plan, sigma: float, sent: int, received: int, role: str) -> None:
        state = self.bg.stash[id(self.model)]
        mine = p.tasks[self.bg.rank]
        self.bg.records.append(StepRecord(
            self.step, role, tuple(t.name + (f":{t.method}" if t.method else "") for t in mine),
            p.passes(sigma)[self.bg.rank], sent + state.sent_bytes, received + state.received_bytes))
        state.sent_bytes = state.received_bytes = 0
        self.step += 1


class ParallelSeparateDriver(SeparateDriver):
    """Separate cond / uncond calls (module docstring: the deferred protocol)."""

    def __init__(self, bg: BranchGroup, adapter: ModelAdapter, model: nn.Module):
        super().__init__()
        self.bg, self.adapter, self.model = bg, adapter, model
        self.branches = _Branches(bg, model, adapter)
        self.held: Optional[dict] = None  # what the cond call left for the uncond call of the same step

    def __call__(self, call: Call, step: int) -> Any:
        if call.role == "uncond":
            self.expect_uncond = None
            return self._uncond(call, step)
        self.expect_uncond, self.held = None, None
        out = self._cond(call, step)
        self.expect_uncond = step if call.cfg_scale is not None else None
        return out

    def _deferred(self, call: Call) -> bool:
        return call.cfg_scale is not None and abs(1.0 - float(call.cfg_scale)) >= SERIAL_BELOW

    def _serial(self, call: Call) -> bool:
        return call.cfg_scale is not None and float(call.cfg_scale) != 1.0 and not self._deferred(call)

    def _cond(self, call: Call, step: int) -> Any:
        bg, s = self.bg, call.settings
        deferred = self._deferred(call)
        p, sigma = self.branches.plan(call, deferred)
        c_in = (call.args, call.kwargs)
        mine = p.tasks[bg.rank]
        if deferred and any(t.kind == "u" for t in mine):
            mine = []  # the u rank's tasks all run in the uncond call, u first (its stash is waiting by then)
        have, out = self.branches.run(call, p, c_in, None, mine)
        n_p = len(call.modes) if s is not None else 0
        if deferred:
            self.held = dict(step=step, plan=p, sigma=sigma, have=have, out=out, c_in=c_in)
            latents = call.kwargs.get("hidden_states", call.args[0] if call.args else None)
            zero = torch.zeros((), dtype=latents.dtype, device=latents.device)
            return _placeholder(call, out, zero)
        got, sent, received = bg.exchange(have, _names(False, n_p), p, next(iter(have.values())))
        _finish_sends(bg.stash[id(self.model)])
        self._record(p, sigma, sent, received, "cond", step)
        c, ps = got["c"], [got[f"p{k}"] for k in range(n_p)]
        if self._serial(call):
            # The single-process fold (separate_fold.py): c' now, u' from u in the uncond call.
            c_ret, adjust = (c, False) if s is None else cond_return(
                c, perturbed_arg(ps), float(call.cfg_scale), stg_scale_arg(s.scales), s.rescale, call.orthogonalize)
            self.held = dict(step=step, serial=True, c=c, ps=ps, c_ret=c_ret, adjust=adjust)
            return with_prediction(out, c_ret)
        f = c if s is None else combine(c, perturbed_arg(ps), None, stg_scale=stg_scale_arg(s.scales),
                                        rescale=s.rescale, orthogonalize=call.orthogonalize)
        self.held = dict(step=step, f=f)  # Wan 2.2 at scale 1 still makes its uncond call: it returns f
        return with_prediction(out, f)

    def _uncond(self, call: Call, step: int) -> Any:
        held, self.held = self.held, None
        if held is None or held["step"] != step:
            return call.forward(*call.args, **call.kwargs)  # no cond call of this step was seen: stock
        if "f" in held:
            # u + 1 (f - u) is f for u = f, exactly; no uncond pass is needed.
            return _placeholder(call, None, held["f"])
        if "serial" in held:
            return self._serial_uncond(call, held, step)
        bg, s, p = self.bg, call.settings, held["plan"]
        have, out = dict(held["have"]), held["out"]
        mine = p.tasks[bg.rank] if any(t.kind == "u" for t in p.tasks[bg.rank]) else []
        u_have, u_out = self.branches.run(call, p, held["c_in"], (call.args, call.kwargs), mine)
        have.update(u_have)
        out = u_out if u_out is not None else out
        n_p = len(call.modes) if s is not None else 0
        got, sent, received = bg.exchange(have, _names(True, n_p), p, next(iter(have.values())))
        _finish_sends(bg.stash[id(self.model)])
        self._record(p, held["sigma"], sent, received, "uncond", step)
        g = call.cfg_scale
        u, c = got["u"], got["c"]
        if s is None:
            f = (u.float() + g * (c.float() - u.float()))
        else:
            ps = [got[f"p{k}"] for k in range(n_p)]
            f = combine(c, perturbed_arg(ps), u, cfg_scale=g, stg_scale=stg_scale_arg(s.scales), rescale=s.rescale,
                        orthogonalize=call.orthogonalize).float()
        # The pipeline computes u' + g (0 - u') with the cond call's 0: u' = f / (1 - g).
        return with_prediction(out, (f / (1.0 - g)).to(u.dtype))

    def _serial_uncond(self, call: Call, held: dict, step: int) -> Any:
        """u on rank 0, sent to the others; then separate_fold's u' (or u itself where the fold needs no u)."""
        bg, s = self.bg, call.settings
        p = Plan([[Task("u")]] + [[] for _ in range(bg.size - 1)], u_rank=0, c_rank=0)
        have, out = self.branches.run(call, p, (call.args, call.kwargs), (call.args, call.kwargs), p.tasks[bg.rank])
        got, sent, received = bg.exchange(have, ["u"], p, held["c"])
        self._record(p, 1.0, sent, received, "uncond", step)
        u = got["u"]
        if not held["adjust"]:
            return _placeholder(call, out, u)
        return _placeholder(call, out, uncond_fold(held["c"], perturbed_arg(held["ps"]), u, held["c_ret"],
                                                   call.cfg_scale, stg_scale_arg(s.scales), s.rescale,
                                                   call.orthogonalize))

    def _record(self, p: Plan, sigma: float, sent: int, received: int, role: str, step: int) -> None:
        state = self.bg.stash[id(self.model)]
        mine = p.tasks[self.bg.rank]
        self.bg.records.append(StepRecord(
            step, role, tuple(t.name + (f":{t.method}" if t.method else "") for t in mine),
            p.passes(sigma)[self.bg.rank], sent + state.sent_bytes, received + state.received_bytes))
        state.sent_bytes = state.received_bytes = 0


def _placeholder(call: Call, out: Any, value: torch.Tensor) -> Any:
    """`value` in the structure of the model's return value (`out` when this rank ran a pass, else built from the
    call: a tuple for return_dict=False, diffusers' Transformer2DModelOutput otherwise)."""
    if out is not None:
        return with_prediction(out, value)
    if call.kwargs.get("return_dict", True) is False:
        return (value,)
    return Transformer2DModelOutput(sample=value)


def attach(session: Any, group: Any, placement: str = "auto") -> Optional[BranchGroup]:
    """Spreads `session`'s branches over `group` (api.apply_stg's `process_group=`): its drivers are replaced by
    the parallel ones, and the stash hooks are installed on the denoisers' blocks (removed with the session).
    `group=None` takes an earlier group off a session whose settings were replaced (its stock drivers return)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"stg_ext: branch_placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    earlier = getattr(session, "branch_group", None)
    if earlier is not None:
        earlier.remove()
        for key in [k for k, d in session.drivers.items() if getattr(d, "bg", None) is earlier]:
            del session.drivers[key]
        session.branch_group = None
    if group is None:
        return None
    if not hasattr(session, "models") or not hasattr(session, "drivers"):
        raise NotImplementedError(f"stg_ext: process_group= is not supported for {type(session).__name__} (guider "
                                  "pipelines combine their branches in their guider)")
    bg = BranchGroup(group, placement)
    locator = getattr(session, "locator", None)
    for binding in (locator.bindings.values() if locator is not None else ()):
        pipe, spec = binding.pipe, binding.spec
        if spec.convention == "separate" and type(pipe).__name__ not in DEFERRED_OK:
            raise NotImplementedError(
                f"stg_ext: process_group= on {type(pipe).__name__}: its CFG line transforms the cond prediction "
                "before the uncond call, so the uncond rank cannot run in parallel; supported separate-call "
                f"pipelines: {', '.join(DEFERRED_OK)}")
    try:
        for name, model in session.models.items():
            adapter = get_adapter(model)
            bg.install(model)
            session.drivers[(name, "cfg_batch")] = ParallelCFGBatchDriver(bg, adapter, model)
            session.drivers[(name, "separate")] = ParallelSeparateDriver(bg, adapter, model)
    except Exception:
        bg.remove()
        raise
    session.on_remove(bg.remove)
    session.branch_group = bg
    session.settle_caches()  # a cache already on the denoisers is refused now (else at the run's start)
    return bg
