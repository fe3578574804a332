"""Caches with process_group= (issue 15): refused, whichever was installed first, with an error naming both (each
rank's cache would see only its own branches' calls). Two local gloo processes."""
from __future__ import annotations

from typing import List

from stg_ext.testing.distributed import run_group


def refusal_worker(rank: int, world: int, orders: List[str]) -> List[str]:
    import warnings

    import torch.distributed as dist
    from diffusers import FirstBlockCacheConfig

    import stg_ext
    from stg_ext.testing.tiny import tiny_pipeline

    warnings.simplefilter("ignore")
    messages = []
    for order in orders:
        tp = tiny_pipeline("mochi", vae=False)
        if order == "cache_first":
            tp.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.3))
            try:  # refused at apply_stg
                stg_ext.apply_stg(tp.pipe, 1, "attention", process_group=dist.group.WORLD)
                messages.append("")
            except ValueError as error:
                messages.append(str(error))
            continue
        session = stg_ext.apply_stg(tp.pipe, 1, "attention", process_group=dist.group.WORLD)
        tp.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.3))
        try:  # refused when the run starts
            tp.pipe(**tp.call_kwargs(steps=2))
            messages.append("")
        except ValueError as error:
            messages.append(str(error))
        session.remove()
    return messages


def test_caches_with_branch_parallelism_are_refused():
    orders = ["cache_first", "stg_first"]
    for messages in run_group(refusal_worker, 2, orders, timeout=600):
        for message in messages:
            assert "process_group=" in message and "First Block Cache" in message, messages
