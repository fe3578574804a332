"""Progress bars for the commands' own loops (sweep, weak, bench); the pipelines show their own."""
from __future__ import annotations

import sys


def progress_bar(*, total: int, desc: str, disable: bool = False, unit: str = "run"):
    """A tqdm bar on stderr (tqdm comes with diffusers); use as a context manager."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True)
