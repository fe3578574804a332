"""The error catalog (docs/errors.md) lists every error stg_ext raises (issue 15).

Each `raise` in stg_ext/ has a key: the first literal piece of its message (at least 10 characters, after the
"stg_ext...: " label that names the raising function), cut to 50 characters, spaces collapsed; a raise without a
message (an abstract method) is keyed "<file> <exception class>". The test fails when a key is missing from the
catalog, so a new error cannot be added without its entry.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from tests._package import source_files

CATALOG = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
LABEL = re.compile(r"^stg_ext[\w.]*(?: \w+)?: ")
MIN_KEY, MAX_KEY = 10, 50


def _pieces(node: ast.AST) -> List[Optional[str]]:
    """The message's literal pieces in order (None for a formatted value or a non-literal part)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value if isinstance(v, ast.Constant) else None for v in node.values]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _pieces(node.left) + _pieces(node.right)
    return [None]


def _normal(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def _key(pieces: List[Optional[str]]) -> Optional[str]:
    first = True
    for piece in pieces:
        if piece is None:
            first = False
            continue
        text = LABEL.sub("", piece) if first else piece
        first = False
        text = _normal(text).strip(" :;,.")
        if len(text) >= MIN_KEY:
            return text[:MAX_KEY].strip(" :;,.")
    return None


def raise_sites() -> Iterator[Tuple[str, int, str, str]]:
    """(file, line, exception class, key) of every raise with an exception in stg_ext/ (its kernels too)."""
    for _, name, path in source_files():
        for node in ast.walk(ast.parse(path.read_text(), name)):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            exc = node.exc
            func = exc.func if isinstance(exc, ast.Call) else exc
            cls = func.id if isinstance(func, ast.Name) else getattr(func, "attr", ast.unparse(func))
            key = _key(_pieces(exc.args[0])) if isinstance(exc, ast.Call) and exc.args else None
            yield name, node.lineno, cls, key or f"{name} {cls}"


def test_every_raise_is_in_the_catalog():
    catalog = _normal(CATALOG.read_text())
    missing = [f"{f}:{line} {cls}: {key!r}" for f, line, cls, key in raise_sites() if _normal(key) not in catalog]
    assert not missing, "errors missing from docs/errors.md:\n" + "\n".join(missing)


def test_the_keys_are_found():
    sites = list(raise_sites())
    assert len(sites) > 150  # the walk sees the package
    assert any(key.startswith("(execution order) was modified in place") for *_, key in sites)
