"""Step cost of STG relative to CFG (STG_SPEC section 5), measured side by side in one run.

For each model geometry (full depth, tiny width 128, ~1024 video tokens; random weights), one guided denoising step
in the family's own calling convention (Mochi, LTX: one call on [uncond, cond]; Wan, HunyuanVideo: a cond call and
an uncond call):
  cfg         - the stock step (what CFG costs);
  sequential  - stg_ext's default: the perturbed branch starts at the first perturbed block from the cond pass's
                activations (prefix reuse);
  naive       - stg_ext with strategy="naive": a full third pass, what every public implementation pays;
  diffusers   - the CFG step plus a full pass with diffusers' own layer-skip hooks (SkipLayerGuidance's weak
                model; for STG-A its `skip_attention_scores`), where they run.
Ratios are step time / CFG step time. floor = (CFG step + the computed share of one batch-1 pass) / CFG step:
STG_SPEC's 2 + (L - l)/L passes (STG-R: 2 + (L - l - 1)/L), with the passes as measured here (on a CPU a batch-2
call costs less than two batch-1 calls, so for batched families the floor is above the pass-count
`pass_floor_ratio`). The parts are timed in rounds, one call of each per round (medians over the rounds).
Peak memory (--memory): the peak of the tensor storages allocated during one call and alive at once (a
TorchDispatchMode tracks them; weights and inputs are not counted).

    python benchmarks/bench_step_cost.py --out bench_out --memory   # table, CSV and PNG
    python benchmarks/bench_step_cost.py --quick                    # 1 repeat, 1 latent frame
    python benchmarks/bench_step_cost.py --compile whole            # the denoiser compiled (inductor): model.compile()
    python benchmarks/bench_step_cost.py --compile regional         # compile_repeated_blocks (each block elsewhere)

With --compile, every part gets its own copy of the model, compiled before STG is applied to it (a session then
runs around the compiled code); the first call of each part is its warm-up and is reported as compile time
(`*_compile_s`: stock's and STG's first call, seconds). diffusers' layer skip is not timed compiled.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import stg_ext

from _timing import write_csv

CFG_SCALE = 4.5
WIDTH_HEADS, HEAD_DIM = 4, 32  # width 128
TEXT_TOKENS = 32


@dataclass
class Geometry:
    name: str
    n_layers: int
    layer: int
    block_list: str  # diffusers LayerSkipConfig fqn of the perturbed block's list
    list_index: int  # index of the perturbed block inside that list
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, int], dict]  # (batch, frames) -> forward kwargs
    convention: str  # how the family's pipelines call the denoiser: "batched" [u, c] or "separate" calls
    lists: Tuple[Tuple[str, int], ...] = (("num_layers", 0),)  # (config key, blocks) per block list, in order

    def at_depth(self, depth: int) -> "Geometry":
        """The same family with about `depth` blocks, each block list shortened in proportion and the perturbed
        block at the same relative depth in its list (the compiled runs: inductor compiles a whole model block by
        block, which at full depth takes longer than a session on this machine)."""
        counts = [max(1, round(n * depth / self.n_layers)) for _, n in self.lists]
        offset = new_offset = 0
        for (_, n), new in zip(self.lists, counts):
            if self.layer < offset + n:  # the perturbed block's list
                index = min(new - 1, round(self.list_index * new / n))
                layer = new_offset + index
                break
            offset, new_offset = offset + n, new_offset + new
        overrides = {key: new for (key, _), new in zip(self.lists, counts)}
        build = self.build

        def shallow():
            full = build()
            return type(full).from_config({**full.config, **overrides})

        return Geometry(f"{self.name}@{sum(counts)}", sum(counts), layer, self.block_list, index, shallow,
                        self.inputs, self.convention, tuple((k, c) for (k, _), c in zip(self.lists, counts)))


def _mochi():
    from diffusers import MochiTransformer3DModel

    return MochiTransformer3DModel(patch_size=2, num_attention_heads=WIDTH_HEADS, attention_head_dim=HEAD_DIM,
                                   num_layers=48, pooled_projection_dim=32, in_channels=12, text_embed_dim=64,
                                   time_embed_dim=32, max_sequence_length=TEXT_TOKENS)


def _mochi_inputs(b, f):
    return dict(hidden_states=torch.randn(b, 12, f, 32, 32), encoder_hidden_states=torch.randn(b, TEXT_TOKENS, 64),
                timestep=torch.full((b,), 500), encoder_attention_mask=torch.ones(b, TEXT_TOKENS))


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(in_channels=32, out_channels=32, patch_size=1, patch_size_t=1,
                                      num_attention_heads=WIDTH_HEADS, attention_head_dim=HEAD_DIM,
                                      cross_attention_dim=WIDTH_HEADS * HEAD_DIM, num_layers=28, caption_channels=64)


def _ltx_inputs(b, f):
    return dict(hidden_states=torch.randn(b, f * 16 * 16, 32), encoder_hidden_states=torch.randn(b, TEXT_TOKENS, 64),
                timestep=torch.full((b,), 500), encoder_attention_mask=torch.ones(b, TEXT_TOKENS),
                num_frames=f, height=16, width=16)


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=WIDTH_HEADS, attention_head_dim=HEAD_DIM,
                                 in_channels=16, out_channels=16, text_dim=64, freq_dim=32, ffn_dim=512, num_layers=30,
                                 rope_max_seq_len=64)


def _wan_inputs(b, f):
    return dict(hidden_states=torch.randn(b, 16, f, 32, 32), encoder_hidden_states=torch.randn(b, TEXT_TOKENS, 64),
                timestep=torch.full((b,), 500))


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=WIDTH_HEADS,
                                          attention_head_dim=HEAD_DIM, num_layers=20, num_single_layers=40,
                                          num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=64,
                                          pooled_projection_dim=32, rope_axes_dim=(8, 12, 12))


def _hunyuan_inputs(b, f):
    return dict(hidden_states=torch.randn(b, 16, f, 32, 32), timestep=torch.full((b,), 500),
                encoder_hidden_states=torch.randn(b, TEXT_TOKENS, 64),
                encoder_attention_mask=torch.ones(b, TEXT_TOKENS), pooled_projections=torch.randn(b, 32),
                guidance=torch.full((b,), 6000.0))


GEOMETRIES = {
    "mochi": Geometry("mochi", 48, 34, "transformer_blocks", 34, _mochi, _mochi_inputs, "batched",
                      (("num_layers", 48),)),
    "ltx-video-2b": Geometry("ltx-video-2b", 28, 19, "transformer_blocks", 19, _ltx, _ltx_inputs, "batched",
                             (("num_layers", 28),)),
    "wan-1.3b": Geometry("wan-1.3b", 30, 8, "blocks", 8, _wan, _wan_inputs, "separate", (("num_layers", 30),)),
    # A single-stream layer: index 40 is single_transformer_blocks[20].
    "hunyuan-video": Geometry("hunyuan-video", 60, 40, "single_transformer_blocks", 20, _hunyuan, _hunyuan_inputs,
                              "separate", (("num_layers", 20), ("num_single_layers", 40))),
}
MODES = ("residual", "attention")
VARIANTS = ("cfg", "sequential", "naive", "diffusers")


def computed_fraction(g: Geometry, mode: str) -> float:
    """The share of the blocks the perturbed branch computes with prefix reuse (STG_SPEC section 5)."""
    return (g.n_layers - g.layer - (1 if mode == "residual" else 0)) / g.n_layers


# What is timed; a step of each variant is a sum of these (see `step_times`).
PARTS = ("pass1", "cfg_batched", "sequential_cond", "naive_cond", "sequential_batched", "naive_batched",
         "diffusers_perturbed")


def part_fn(part: str, g: Geometry, mode: str, model: torch.nn.Module, frames: int) -> Callable[[], object]:
    """A callable timing one part; installs what it needs on `model` (call `.cleanup` on the result after)."""
    torch.manual_seed(0)
    batched = g.inputs(2, frames)
    cond = {k: (v[1:] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2 else v) for k, v in batched.items()}
    inputs = batched if part.endswith("batched") else cond

    def call():
        with torch.no_grad():
            return model(**inputs, return_dict=False)

    call.cleanup = lambda: None
    if part in ("pass1", "cfg_batched"):
        return call
    if part != "diffusers_perturbed":
        strategy = part.split("_")[0]
        # On the batched [u, c] input the session folds CFG + STG; on a cond-only input (separate-call pipelines)
        # it computes c + s (c - p): the same passes as the cond call of a CFG step plus the perturbed branch.
        session = stg_ext.apply_stg(model, g.layer, mode, cfg_scale=CFG_SCALE if part.endswith("batched") else None,
                                    strategy=strategy)
        call.cleanup = session.remove
        return call
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    if mode == "residual":
        config = LayerSkipConfig(indices=[g.list_index], fqn=g.block_list, skip_attention=True, skip_ff=True)
    else:
        config = LayerSkipConfig(indices=[g.list_index], fqn=g.block_list, skip_attention=False, skip_ff=False,
                                 skip_attention_scores=True)
    apply_layer_skip(model, config)
    call.cleanup = lambda: _remove_diffusers_hooks(model)
    return call


def _remove_diffusers_hooks(model: torch.nn.Module) -> None:
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            for name in reversed(list(registry.hooks)):
                registry.remove_hook(name, recurse=False)
            module.__dict__.pop("forward", None)
            del module._diffusers_hook


def step_times(g: Geometry, mode: str, t: Dict[str, float]) -> Dict[str, Optional[float]]:
    """Step time of each variant from the timed parts, in the pipeline family's own calling convention."""
    frac = computed_fraction(g, mode)
    slg = t.get("diffusers_perturbed")
    if g.convention == "batched":  # one call on [uncond, cond]
        cfg = t["cfg_batched"]
        return dict(cfg=cfg, sequential=t["sequential_batched"], naive=t["naive_batched"],
                    diffusers=None if slg is None else cfg + slg, floor=cfg + frac * t["pass1"])
    cfg = 2 * t["pass1"]  # a cond call and an uncond call
    return dict(cfg=cfg, sequential=t["sequential_cond"] + t["pass1"], naive=t["naive_cond"] + t["pass1"],
                diffusers=None if slg is None else cfg + slg, floor=cfg + frac * t["pass1"])


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that the ops inside the mode allocate and that are alive at once (weights
    and inputs made before are not counted): the step's transient memory, exactly, on any device."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: Dict[int, weakref.finalize] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self.live += storage.nbytes()
                    self._seen[key] = weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def peak_mib(fn: Callable[[], object]) -> float:
    with LiveTensorBytes() as mode:
        fn()
    return mode.peak / 2 ** 20


def _row(name: str, g: Geometry, mode: str, frames: int, steps: Dict[str, Optional[float]]) -> dict:
    """One table row: each variant's step time and its ratio to the CFG step, and the floor."""
    row = dict(model=name, mode=mode, convention=g.convention, layers=g.n_layers, layer=g.layer, frames=frames,
               cfg_ms=round(steps["cfg"] * 1e3, 1))
    for variant in VARIANTS[1:]:
        v = steps[variant]
        row[f"{variant}_ms"] = None if v is None else round(v * 1e3, 1)
        row[f"{variant}_ratio"] = None if v is None else round(v / steps["cfg"], 3)
    row["floor_ratio"] = round(steps["floor"] / steps["cfg"], 3)
    row["pass_floor_ratio"] = round(1 + computed_fraction(g, mode) / 2, 3)
    row["sequential_vs_floor"] = round(steps["sequential"] / steps["floor"], 3)
    return row


def compile_model(model: torch.nn.Module, how: str, backend: str = "inductor", fullgraph: bool = False) -> None:
    """`how`: "whole" (model.compile()) or "regional" (diffusers' compile_repeated_blocks where the family defines
    its repeated blocks, with `fullgraph`; else each block of its block lists, never fullgraph: Mochi's attention
    breaks its graph itself)."""
    if how == "whole":
        model.compile(backend=backend)
    elif getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(backend=backend, fullgraph=fullgraph)
    else:
        for name in ("transformer_blocks", "single_transformer_blocks", "blocks"):
            for block in getattr(model, name, []):
                block.compile(backend=backend)


def geometry(name: str, depth: Optional[int] = None, layer: Optional[int] = None) -> Geometry:
    """A benchmark geometry, optionally with about `depth` blocks and the perturbed block at `layer` (families with
    one block list)."""
    g = GEOMETRIES[name] if depth is None else GEOMETRIES[name].at_depth(depth)
    if layer is not None:
        if len(g.lists) != 1 or not 0 <= layer < g.n_layers:
            raise SystemExit(f"--layer {layer}: {g.name} has {g.n_layers} blocks in {len(g.lists)} list(s); "
                             "--layer takes a block of a one-list family")
        g = dataclasses.replace(g, layer=layer, list_index=layer, name=f"{g.name}:l{layer}")
    return g


def run_compiled(names: List[str], repeats: int, frames: int, how: str, depth: Optional[int] = None,
                 layer: Optional[int] = None) -> List[dict]:
    """As `run`, with each part on its own compiled copy of the model, set up once (no reinstallation between
    rounds: a compiled model keeps its code)."""
    # Every part's copy shares the blocks' code objects, hence one dynamo cache: with STG installed on several copies
    # at once their variants add up past the default recompile limit (8), which one model with one installation
    # stays below (tests/guidance/test_compile.py checks that with the default).
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for name in names:
        g = geometry(name, depth, layer)
        torch.manual_seed(0)
        base = g.build().eval()
        # only the parts the family's calling convention uses (diffusers' layer skip is not timed compiled)
        parts = ("pass1", "cfg_batched", "sequential_batched", "naive_batched") if g.convention == "batched" else \
            ("pass1", "sequential_cond", "naive_cond")
        for mode in MODES:
            torch._dynamo.reset()
            fns, first = {}, {}
            for part in parts:
                model = copy.deepcopy(base)
                compile_model(model, how)
                fns[part] = part_fn(part, g, mode, model, frames)
                start = time.perf_counter()
                fns[part]()
                first[part] = time.perf_counter() - start
            samples: Dict[str, List[float]] = {part: [] for part in fns}
            for round_ in range(repeats + 1):
                for part, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    if round_:
                        samples[part].append(time.perf_counter() - start)
            stock_part = "cfg_batched" if g.convention == "batched" else "pass1"
            stg_part = "sequential_batched" if g.convention == "batched" else "sequential_cond"
            # the compiled STG call against eager STG on the uncompiled model (same inputs: part_fn seeds them)
            got = fns[stg_part]()[0]
            eager = part_fn(stg_part, g, mode, base, frames)
            want = eager()[0]
            eager.cleanup()
            for fn in fns.values():
                fn.cleanup()
            t = {part: statistics.median(v) for part, v in samples.items()}
            row = dict(_row(g.name, g, mode, frames, step_times(g, mode, t)), compile=how)
            row["max_err_vs_eager"] = float((got - want).abs().max() / want.abs().max())
            row["stock_compile_s"] = round(first[stock_part], 1)
            row["stg_compile_s"] = round(first[stg_part], 1)
            rows.append(row)
            print(_line(row) + f"  first call: stock {row['stock_compile_s']} s, STG {row['stg_compile_s']} s"
                  f"  max|compiled - eager| / max|eager| = {row['max_err_vs_eager']:.1e}", flush=True)
    return rows


def run(names: List[str], repeats: int, frames: int, memory: bool, depth: Optional[int] = None,
        layer: Optional[int] = None) -> List[dict]:
    """Times every part of a (model, mode) in rounds, one call of each part per round (a load change on a shared
    machine then hits all parts alike), and takes the median over the rounds after the first (warm-up)."""
    rows = []
    for name in names:
        g = geometry(name, depth, layer)
        torch.manual_seed(0)
        model = g.build().eval()
        for mode in MODES:
            samples: Dict[str, List[float]] = {part: [] for part in PARTS}
            peaks: Dict[str, float] = {}
            for round_ in range(repeats + 1):
                for part in list(samples):
                    fn = None
                    try:
                        fn = part_fn(part, g, mode, model, frames)
                        start = time.perf_counter()
                        fn()
                        if round_:
                            samples[part].append(time.perf_counter() - start)
                        elif memory:
                            peaks[part] = peak_mib(fn)
                    except Exception as exc:  # diffusers' layer skip does not run on every model
                        print(f"{name}/{mode}/{part}: does not run ({type(exc).__name__}: {str(exc)[:100]})")
                        del samples[part]
                        _remove_diffusers_hooks(model)
                    finally:
                        if fn is not None:
                            fn.cleanup()
            t = {part: statistics.median(v) for part, v in samples.items()}
            row = _row(g.name, g, mode, frames, step_times(g, mode, t))
            if memory:
                # Transient tensor memory of one call (MiB): CFG's call, and the STG call (stock pass + perturbed
                # branch + combine) of each strategy, in the family's convention.
                conv = "batched" if g.convention == "batched" else "cond"
                for variant, part in (("cfg", "cfg_batched" if conv == "batched" else "pass1"),
                                      ("sequential", f"sequential_{conv}"), ("naive", f"naive_{conv}")):
                    row[f"{variant}_peak_mib"] = round(peaks[part], 2) if part in peaks else None
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    ratios = "  ".join(f"{v}={row.get(f'{v}_ratio')}" for v in VARIANTS[1:])
    return (f"{row['model']:>14} {row['mode']:>9}  cfg {row['cfg_ms']:8.1f} ms  {ratios}  floor={row['floor_ratio']}"
            f"  sequential/floor={row['sequential_vs_floor']}")


def plot(rows: List[dict], out_dir: str, name: str = "step_cost", how: str = "none") -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    labels = [f"{r['model']}\n{r['mode']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    width = 0.2
    for k, variant in enumerate(("sequential", "naive", "diffusers")):
        vals = [r.get(f"{variant}_ratio") or 0 for r in rows]
        ax.bar([x + (k - 1) * width for x in xs], vals, width, label=f"{variant}")
    ax.scatter(list(xs), [r["floor_ratio"] for r in rows], color="black", marker="_", s=400, label="floor", zorder=3)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("step time / CFG step time")
    depth = "full depth" if all("@" not in r["model"] for r in rows) else "shortened depth"
    compiled = {"none": "eager", "whole": "compiled whole (inductor)", "regional": "compiled regionally (inductor)"}[how]
    ax.set_title(f"STG step cost, {compiled} (tiny width, {depth}, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out", help="folder for step_cost.csv and step_cost.png")
    parser.add_argument("--models", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--frames", type=int, default=4, help="latent frames (each 16x16 tokens after patching)")
    parser.add_argument("--memory", action="store_true", help="also measure the peak transient tensor memory")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 1 latent frame")
    parser.add_argument("--compile", default="none", choices=("none", "whole", "regional"),
                        help="time the denoiser compiled with inductor: whole (model.compile()) or regional")
    parser.add_argument("--depth", type=int, help="about this many blocks per model (each block list shortened in "
                                                  "proportion, the layer at the same relative depth)")
    parser.add_argument("--layer", type=int, help="the perturbed block (one-list families; after --depth)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.frames = 1, 1
    if args.compile == "none":
        rows = run(args.models, args.repeats, args.frames, args.memory, args.depth, args.layer)
        name = "step_cost"
    else:
        rows = run_compiled(args.models, args.repeats, args.frames, args.compile, args.depth, args.layer)
        name = f"step_cost_{args.compile}"
    write_csv(rows, args.out, f"{name}.csv")
    plot(rows, args.out, name, args.compile)
    return rows


if __name__ == "__main__":
    main()
