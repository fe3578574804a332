"""The prefix stash's guard: the tensors stashed for replay must not change before the replay reads them.

The stash holds references (views, for the cond rows of a batched call) to what the first perturbed block received
in the stock pass. A block that modifies one of them in place afterwards (that block itself, a later block, or a
hook) would make the perturbed pass start from values the stock pass never had, silently. Every in-place op bumps
a tensor's version counter (shared by a tensor and its views); the counters are Python ints kept on the host, so
reading them costs no device sync. They are read in eager frames only: inside a compiled frame a version is a
data-dependent value (see the README, "Compiled denoisers").
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch.utils._pytree import tree_leaves


class StashModifiedError(RuntimeError):
    """A stashed tensor was modified in place between the stash and its replay."""


class StashVersions:
    """The version counters of every tensor in a stash, when it was taken."""

    def __init__(self, entries: List[Tuple[str, torch.Tensor, int]]):
        self.entries = entries

    @classmethod
    def take(cls, stash: Tuple[tuple, dict]) -> "StashVersions":
        args, kwargs = stash
        entries = []
        for name, value in [(f"argument {i}", a) for i, a in enumerate(args)] + [(repr(k), v) for k, v in kwargs.items()]:
            for leaf in tree_leaves(value):
                # Inference-mode tensors have no version counter (and cannot be modified in place outside
                # inference mode).
                if isinstance(leaf, torch.Tensor) and not leaf.is_inference():
                    entries.append((name, leaf, leaf._version))
        return cls(entries)

    def check(self, block: int) -> None:
        for name, tensor, version in self.entries:
            if tensor._version != version:
                raise StashModifiedError(
                    f"stg_ext: {name} of block {block} (execution order) was modified in place "
                    f"after prefix reuse stashed it for the perturbed pass (version {version} -> {tensor._version}); "
                    "the perturbed branch would start from values the stock pass never had. A block or hook "
                    "modifies its inputs in place: use strategy='naive' (the full third pass, no stash) or make "
                    "the modification out of place")
