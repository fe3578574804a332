"""Running a function on N local CPU processes joined by a gloo process group (tests and benchmarks).

    results = run_group(worker, 2, "wan", timeout=120)   # worker(rank, world_size, "wan") in each process

Each process is spawned (a fresh interpreter), joins a gloo group on 127.0.0.1 at a free port, runs
`fn(rank, world_size, *args)` with one torch thread, and sends back its return value (picklable). The group is
destroyed in every process whatever happens; a process that raises sends its traceback and `run_group` raises
`WorkerError` with it; past `timeout` seconds every process still running is terminated (by its own handle) and
`run_group` raises `TimeoutError`. `fn` must be importable by name (a module-level function).

diffusers 0.42.1's `enable_parallelism` divides by `torch.accelerator.device_count()`, which is 0 on a CPU-only
machine: `cpu_device_count()` (called in every worker) makes it report 1.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import traceback
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_group", "WorkerError", "cpu_device_count", "free_port"]


class WorkerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_device_count() -> None:
    """On a machine without an accelerator, make torch.accelerator.device_count() report 1 (diffusers'
    enable_parallelism computes `rank % device_count`)."""
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1


def _worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple, results: Any,
            timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    cpu_device_count()
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            out = fn(rank, world_size, *args)
            # By value (plain pickle): torch's queue pickler would share tensors through this process's fds.
            results.put((rank, True, pickle.dumps(out)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))


def run_group(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, threads: int = 1) -> List[Any]:
    """`fn(rank, world_size, *args)` on `world_size` processes; returns their return values by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, threads, fn, args, results, timeout),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: List[Optional[Any]] = [None] * world_size
    errors = []
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        for _ in range(world_size):
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, ok, value = results.get(timeout=max(left, 0.1))
            except queue.Empty:
                raise TimeoutError(f"run_group: {fn.__name__} on {world_size} processes did not finish in "
                                   f"{timeout:.0f} s") from None
            if ok:
                out[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the others may wait for it forever: stop them
        if errors:
            raise WorkerError("\n".join(errors))
        for p in procs:
            p.join(timeout=max((deadline - datetime.datetime.now()).total_seconds(), 1.0))
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
