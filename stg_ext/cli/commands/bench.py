"""`stg-ext bench`: runs the repository's benchmark scripts (benchmarks/bench_*.py), CSV and plots in --out.

The benchmarks are scripts of the repository checkout, not part of the installed package: they are found in
`benchmarks/` beside the `stg_ext` package folder (an editable install, or running from the checkout), or
wherever --benchmarks points."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional

from ..errors import CLIError, UsageError, one_line
from ..progress import progress_bar
from ..video import ensure_writable_dir
from .. import options

HELP = "the repository's benchmarks (combine op, identity attention, step cost): CSV and plots"

# Per benchmark: the arguments --quick passes (QUICK_ARGS) and what it changes in the loaded module first
# (QUICK_SETUP). Benchmarks not listed run with `--out DIR`, plus `--quick` under --quick.
QUICK_ARGS: Dict[str, List[str]] = {
    "bench_combine": ["--quick"],
    "bench_identity_attention": ["--quick", "--n", "512", "--t", "32"],
    # Its own --quick still runs four full-depth geometries (minutes on 2 cores): one, once.
    "bench_step_cost": ["--quick", "--models", "ltx-video-2b", "--repeats", "1"],
}


def _quick_combine(module: ModuleType) -> None:
    """bench_combine has no size option: under --quick it runs one small latent shape (a Mochi latent at a
    quarter of its frames, height and width) in fp32, so that torch.compile builds one kernel instead of six."""
    module.LATENT_SHAPES = {"mochi/4": (1, 12, 7, 15, 26)}
    module.DTYPES = {"fp32": module.DTYPES["fp32"]}


QUICK_SETUP: Dict[str, Callable[[ModuleType], None]] = {"bench_combine": _quick_combine}



def _quick_lines() -> str:
    notes = {"bench_combine": ", one Mochi latent at a quarter size, fp32 only"}
    return "\n".join(f"  {name}: {' '.join(argv)}{notes.get(name, '')}" for name, argv in QUICK_ARGS.items())


DESCRIPTION = f"""\
Runs each benchmark script of the repository's benchmarks/ folder (bench_*.py: the fused combine op, the
identity joint attention and the STG/CFG step cost of the other issues) with their --out set to this
command's --out, so that their CSV files and plots land there, and lists what they wrote.

The benchmarks live in the repository checkout, not in the installed package: they are looked up in
benchmarks/ next to the stg_ext package folder (editable installs and checkouts), or in --benchmarks DIR.

--quick: a smoke run (about a minute on 2 cores) with few repeats and small sizes; its numbers are not
the benchmark's:
{_quick_lines()}"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="folder for the CSV files and plots (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    p.add_argument("--only", help="comma-separated benchmark names (e.g. combine,identity_attention; default: all)")
    p.add_argument("--benchmarks", help="the benchmarks folder (default: benchmarks/ of the repository checkout)")
    options.add_common(p)
    p.set_defaults(run=run)


def find_benchmarks(folder: Optional[str]) -> Path:
    if folder is not None:
        path = Path(folder)
        if not path.is_dir():
            raise UsageError(f"--benchmarks {folder!r} is not a folder")
        return path
    # Next to the package in a checkout (pip install -e .); else the checkout the command runs in (a wheel
    # installed from it with pip install .).
    beside = Path(__file__).resolve().parents[3] / "benchmarks"
    for path in (beside, Path.cwd() / "benchmarks"):
        if (path / "bench_combine.py").is_file():
            return path
    raise CLIError(f"no benchmarks folder at {beside} or in the current folder: the benchmarks are part of the "
                   "repository checkout, not of the installed package; run from a checkout or pass --benchmarks DIR")


@contextmanager
def _importable(folder: Path) -> Iterator[None]:
    """The benchmark scripts import their shared helpers (`_timing`) as top-level modules."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        try:
            sys.path.remove(str(folder))
        except ValueError:
            pass


def _load(path: Path) -> ModuleType:
    name = f"stg_ext_bench_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (and pickling) look a class's module up in sys.modules
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        del sys.modules[name]
        raise CLIError(f"cannot load {path.name}: {type(e).__name__}: {one_line(e)[:300]}") from e
    if not callable(getattr(module, "main", None)):
        raise CLIError(f"{path.name} has no main(argv) function")
    return module


def run(args: argparse.Namespace) -> int:
    folder = find_benchmarks(args.benchmarks)
    scripts = sorted(folder.glob("bench_*.py"))
    if args.only:
        wanted = {n.strip().removeprefix("bench_") for n in args.only.split(",") if n.strip()}
        unknown = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            raise UsageError(f"--only: no benchmark named {', '.join(sorted(unknown))}; available: "
                             f"{', '.join(s.stem.removeprefix('bench_') for s in scripts)}")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    if not scripts:
        raise CLIError(f"no bench_*.py in {folder}")
    out = ensure_writable_dir(args.out)
    before = {p.name: p.stat().st_mtime for p in out.iterdir()}

    with _importable(folder), progress_bar(total=len(scripts), desc="bench", disable=args.quiet,
                                           unit="benchmark") as bar:
        for script in scripts:
            bar.set_postfix_str(script.stem)
            argv = ["--out", str(out)] + (QUICK_ARGS.get(script.stem, ["--quick"]) if args.quick else [])
            module = _load(script)
            if args.quick and script.stem in QUICK_SETUP:
                QUICK_SETUP[script.stem](module)
            print(f"== {script.stem} {' '.join(argv)}", flush=True)
            try:
                code = module.main(argv)
            except SystemExit as e:  # argparse inside the script
                code = e.code
            except Exception as e:
                raise CLIError(f"{script.name} failed: {type(e).__name__}: {one_line(e)[:300]}") from e
            # main() returns an exit code, or (some scripts) their rows: only a non-zero code is a failure.
            if isinstance(code, int) and not isinstance(code, bool) and code != 0:
                raise CLIError(f"{script.name} exited with code {code}")
            bar.update()

    written = sorted(p for p in out.iterdir() if p.is_file() and before.get(p.name) != p.stat().st_mtime)
    for path in written:
        print(f"wrote {path}")
    return 0
