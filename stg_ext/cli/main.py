"""`stg-ext`: the command line (also `python -m stg_ext`).

Each command lives in stg_ext/cli/commands/<name>.py with `add_parser(subparsers)` and `run(args)`.
Errors end as one line on stderr, `stg-ext: error: ...`, and exit code 2 (usage) or 1 (anything else);
`--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from contextlib import contextmanager
from typing import Iterator, List, Optional

# The command line prints its own one-line errors: transformers' import-time notices (e.g. about torchvision, pulled
# in by the pipelines' image processors) are silenced unless the user asked for a verbosity (`--verbose` raises
# every library's log level again at run time).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import diffusers.utils.logging as dlog  # noqa: E402  (after the verbosity above)
import torch  # noqa: E402

from .. import __version__
from .commands import bench, demo, generate, sweep, weak
from .commands import eval as eval_
from .errors import CLIError, UsageError, one_line

PROG = "stg-ext"

DESCRIPTION = """\
Spatiotemporal Skip Guidance (STG, arXiv 2411.18664) for stock diffusers video pipelines.

MODEL is a hub id, a local pipeline folder, or tiny:<family> (e.g. tiny:wan) for an offline tiny pipeline.
Run `stg-ext <command> --help` for every option of a command."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (one line, exit 2) instead of printed as usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (demo, generate, sweep, weak, bench, eval_):
        module.add_parser(sub)
    return parser


def _version() -> str:
    return __version__


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each message (tests and embedding programs swap it)."""

    _stg_ext_cli = True

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(args: argparse.Namespace) -> None:
    """stg-ext's own messages on stderr with its prefix; the libraries' warnings only with --verbose (they
    are mostly about configs of the models, not about what the user asked)."""
    logger = logging.getLogger("stg_ext.cli")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    verbose = getattr(args, "verbose", False)
    try:
        dlog.set_verbosity_info() if verbose else dlog.set_verbosity_error()
        if getattr(args, "quiet", False):
            dlog.disable_progress_bar()
        else:
            dlog.enable_progress_bar()
    except ImportError:
        pass
    try:  # imported here only for its switches; the commands that build models import it anyway
        import transformers.utils.logging as tlog

        tlog.set_verbosity_warning() if verbose else tlog.set_verbosity_error()
        if getattr(args, "quiet", False):
            tlog.disable_progress_bar()
        else:
            tlog.enable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("stg_ext").setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)


@contextmanager
def _process_state() -> Iterator[None]:
    """Gives back what a command changes process-wide (torch threads, the libraries' log levels and progress
    bars, warning filters), so that main() can be called from a program or a test without side effects."""

    threads = torch.get_num_threads()
    levels = {name: logging.getLogger(name).level for name in ("stg_ext", "stg_ext.cli", "diffusers", "transformers")}
    # Progress-bar switches of the libraries already imported (the others start enabled when imported).
    bars = {name: sys.modules[f"{name}.utils.logging"].is_progress_bar_enabled()
            for name in ("diffusers", "transformers") if f"{name}.utils.logging" in sys.modules}
    try:
        with warnings.catch_warnings():
            yield
    finally:
        torch.set_num_threads(threads)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name in ("diffusers", "transformers"):
            module = sys.modules.get(f"{name}.utils.logging")
            if module is not None:
                (module.enable_progress_bar if bars.get(name, True) else module.disable_progress_bar)()


def main(argv: Optional[List[str]] = None) -> int:
    """Runs one command; returns the exit code (0 on success)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with _process_state():
        return _main(argv)


def _main(argv: List[str]) -> int:
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        configure_logging(args)
        return int(args.run(args) or 0)
    except SystemExit as e:  # --help, --version (argparse's own exits)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except CLIError as e:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a bug or an unforeseen failure: still one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run again with --debug for the traceback)"
        print(f"{PROG}: error: {type(e).__name__}: {one_line(e)[:500]}{hint}", file=sys.stderr)
        return 1


def run() -> None:
    """The console script's entry point."""
    sys.exit(main())
