"""A command's independent jobs (a sweep's (prompt, seed, layer) renders) split over the processes `torchrun`
starts, with the rows gathered back in the one-process order:

    torchrun --standalone --nproc-per-node 2 -m stg_ext sweep tiny:wan --layers 0:3 --out sweep_out

Under torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment) `JobGroup()` joins a gloo group
(CPU objects only travel: the rows); otherwise it is one process and everything is a no-op. Jobs go round-robin
(job i to rank i mod N: neighbouring jobs cost about the same, so the ranks stay balanced), every rank renders its
own, and rank 0 receives every rank's rows, puts them back in job order and writes the files; the other ranks write
nothing (videos excepted: each rank writes its own). The rows are those one process would write (the renders are
seeded and deterministic), except for the timings.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Iterable, List, Sequence, Tuple

import torch.distributed as dist

__all__ = ["JobGroup"]


class JobGroup:
    def __init__(self, timeout_s: float = 3600.0):
        self.owned = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
            self.owned = True
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.size = dist.get_world_size() if self.distributed else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, jobs: Sequence[Any]) -> List[Tuple[int, Any]]:
        """This rank's jobs with their indices (round-robin)."""
        return [(i, job) for i, job in enumerate(jobs) if i % self.size == self.rank]

    def gather(self, indexed_rows: Iterable[Tuple[int, Any]]) -> List[Any]:
        """Rank 0: every rank's rows in job order; other ranks: []."""
        rows = list(indexed_rows)
        if not self.distributed:
            return [row for _, row in sorted(rows, key=lambda x: x[0])]
        parts = [None] * self.size if self.is_main else None
        dist.gather_object(rows, parts, dst=0)
        if not self.is_main:
            return []
        merged = [item for part in parts for item in part]
        return [row for _, row in sorted(merged, key=lambda x: x[0])]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owned = False

    def __enter__(self) -> "JobGroup":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self.owned and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: another rank may be gone
            self.owned = False
