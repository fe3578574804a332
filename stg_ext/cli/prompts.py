"""Prompt lists for `--prompts`: the paper's appendix lists shipped with the package, or a text file.

Files hold one prompt per line; blank lines and lines starting with '#' are ignored."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

from .errors import UsageError

PROMPT_DIR = Path(__file__).resolve().parent.parent / "prompts"

#: Names of the shipped lists (stg_ext/prompts/<name>.txt) and what they are.
BUILTIN: Dict[str, str] = {
    "curated": "the paper's curated demo prompts (appendix A1.5, 25 prompts)",
    "evalcrafter": "the EvalCrafter prompts the appendix lists (A1.5, 42 prompts)",
    "figures": "the prompts of the paper's main figures (Fig. 2 and 4, 5 prompts)",
}


def read_prompt_file(path: os.PathLike) -> List[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read prompt file {str(path)!r}: {e.strerror or e}") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UsageError(f"prompt file {str(path)!r} holds no prompt")
    return prompts


def load_prompts(spec: str) -> List[str]:
    """`spec` is a shipped list's name (see BUILTIN) or the path of a prompt file."""
    if spec in BUILTIN:
        return read_prompt_file(PROMPT_DIR / f"{spec}.txt")
    if os.path.exists(spec):
        return read_prompt_file(spec)
    raise UsageError(f"--prompts {spec!r} is neither a shipped list ({', '.join(BUILTIN)}) nor an existing file")


def builtin_help() -> str:
    return "; ".join(f"'{name}': {what}" for name, what in BUILTIN.items())
