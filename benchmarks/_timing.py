"""What every benchmark script here shares: wall-clock medians and the CSV it writes."""
from __future__ import annotations

import csv
import os
import statistics
import time
from typing import Callable, List


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_csv(rows: List[dict], out_dir: str, filename: str) -> str:
    """Writes rows (columns: every key any row has, first-seen order) to out_dir/filename; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, filename)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path
