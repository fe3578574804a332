"""Sampling one pipeline from two threads at once: refused with a clear error, never mixed.

stg_ext keeps a pipeline's loop state (the run, its step count) on the pipeline's tracker and a denoiser's pass
state (which perturbation is live, the prefix stash) on the denoiser, as diffusers keeps a scheduler's state on the
scheduler: one sampling run at a time. A second thread that starts sampling (or steps, or calls the denoiser)
while the first is still inside a call of the same pipeline (or inside a pass of the same denoiser) gets
`ConcurrentSamplingError`; the first thread's run goes on unaffected. Threads that take turns are fine, and so are
two pipelines (with their own denoisers) in two threads.
"""
from __future__ import annotations

import sys
import threading
from types import FrameType
from typing import Callable, Optional


class ConcurrentSamplingError(RuntimeError):
    """Two threads sample one pipeline (or run one denoiser) at the same time."""


def _message(what: str) -> str:
    return (f"stg_ext: {what} is already sampling in another thread; stg_ext keeps one run's state per pipeline "
            "and denoiser (as the scheduler does), so two threads cannot sample it at once. Use one pipeline per "
            "thread (each with its own denoiser), or take turns")


def in_call(thread: int, is_ours: Callable[[FrameType], bool]) -> bool:
    """Whether a frame on `thread`'s stack (now) is one for which `is_ours(frame)` holds (a method of the pipeline)."""
    frame = sys._current_frames().get(thread)
    while frame is not None:
        if is_ours(frame):
            return True
        frame = frame.f_back
    return False


def check_run_owner(owner: Optional[int], is_ours: Callable[[FrameType], bool], what: str) -> None:
    """Raises when the run belongs to another thread that is still inside a call of the pipeline (a thread that
    has returned from it leaves the next run to whichever thread starts one). Costs nothing in the owner thread."""
    if owner is not None and owner != threading.get_ident() and in_call(owner, is_ours):
        raise ConcurrentSamplingError(_message(what))


class PassOwner:
    """Which thread is inside a pass of one denoiser (re-entrant for that thread)."""

    def __init__(self, what: str):
        self.what = what
        self.thread: Optional[int] = None
        self.depth = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        me = threading.get_ident()
        with self._lock:
            if self.thread is not None and self.thread != me:
                raise ConcurrentSamplingError(_message(self.what))
            self.thread, self.depth = me, self.depth + 1

    def exit(self) -> None:
        with self._lock:
            self.depth -= 1
            if self.depth <= 0:
                self.thread, self.depth = None, 0

    def __deepcopy__(self, memo: dict) -> "PassOwner":
        return PassOwner(self.what)  # a lock cannot be copied; a copy is idle
