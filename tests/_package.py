"""Where stg_ext's Python sources are, as imported: in a checkout `stg_ext/` and `kernels/` (mapped to
`stg_ext.kernels` by setup.py), in an installed wheel `site-packages/stg_ext/` with `kernels/` inside it. The
layout and error-catalog tests read these, so they check whichever copy the tests import (CI part 2 runs them
against the installed wheel)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Tuple

import stg_ext

PACKAGE = Path(stg_ext.__file__).resolve().parent
# The folder the relative names are taken from (a checkout's root, or site-packages).
BASE = PACKAGE.parent
_CHECKOUT_KERNELS = BASE / "kernels"
KERNELS = PACKAGE / "kernels" if (PACKAGE / "kernels").is_dir() else _CHECKOUT_KERNELS


def source_files() -> Iterator[Tuple[str, str, Path]]:
    """(module name, path relative to BASE, path) of every .py file of the package, stg_ext.kernels included."""
    for folder, prefix in ((PACKAGE, "stg_ext"), (KERNELS, "stg_ext.kernels")):
        for path in sorted(folder.rglob("*.py")):
            if folder == PACKAGE and KERNELS.parent == PACKAGE and KERNELS in path.parents:
                continue  # installed: kernels/ is inside the package, listed once under its own prefix
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((prefix,) + parts), str(path.relative_to(BASE)), path
