"""Threads (issue 15): two threads sampling one pipeline at once get ConcurrentSamplingError (the first thread's run
is unaffected); two pipelines in two threads, their steps interleaved, each give what they give alone.

A step callback or a forward pre-hook holds a thread inside the pipeline's call (a barrier or an event), so the
threads really overlap.
"""
from __future__ import annotations

import threading
import warnings

import pytest
import torch

import stg_ext
from stg_ext.guidance.threads import ConcurrentSamplingError
from stg_ext.testing.tiny import tiny_pipeline

STEPS = 3
TIMEOUT = 120


def _run(tp, callback=None):
    kw = tp.call_kwargs(steps=STEPS)
    if callback is not None:
        kw["callback_on_step_end"] = callback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pipe(**kw).frames


def _holding(model, inside: threading.Event, release: threading.Event):
    """A forward pre-hook on the denoiser that, at its first call (in the first step), signals `inside` and waits
    for `release` (HunyuanVideo 1.5 has no step callback)."""
    calls = [0]

    def pre_hook(module, args):
        calls[0] += 1
        if calls[0] == 1:
            inside.set()
            assert release.wait(TIMEOUT)

    return model.register_forward_pre_hook(pre_hook)


@pytest.mark.parametrize("family,layer", [("wan", 1), ("mochi", 1), ("hunyuan_video15", 1)])
def test_two_threads_on_one_pipeline_is_an_error(family, layer):
    tp = tiny_pipeline(family, vae=False)
    stg_ext.apply_stg(tp.pipe, layer, "residual", scale=1.0, rescale=0.5)
    try:
        alone = _run(tp)
        inside, release, result = threading.Event(), threading.Event(), {}

        def first():
            result["first"] = _run(tp)

        hold = _holding(tp.pipe.transformer, inside, release)
        thread = threading.Thread(target=first)
        thread.start()
        try:
            assert inside.wait(TIMEOUT)
            with pytest.raises(ConcurrentSamplingError, match="already sampling in another thread"):
                _run(tp)
        finally:
            release.set()
            thread.join(TIMEOUT)
            hold.remove()
        torch.testing.assert_close(result["first"], alone, rtol=0, atol=0)  # the first run went on unaffected
        torch.testing.assert_close(_run(tp), alone, rtol=0, atol=0)  # taking turns is fine
    finally:
        stg_ext.remove_stg(tp.pipe)


def test_threads_taking_turns_on_one_pipeline():
    tp = tiny_pipeline("wan", vae=False)
    with stg_ext.apply_stg(tp.pipe, 1, "attention", scale=1.0):
        alone = _run(tp)
        out = {}
        for k in range(2):
            thread = threading.Thread(target=lambda k=k: out.update({k: _run(tp)}))
            thread.start()
            thread.join(TIMEOUT)
    for k in range(2):
        torch.testing.assert_close(out[k], alone, rtol=0, atol=0)


@pytest.mark.parametrize("families", [("wan", "wan"), ("wan", "mochi")])
def test_two_pipelines_in_two_threads(families):
    tps = [tiny_pipeline(f, vae=False) for f in families]
    for tp in tps:
        stg_ext.apply_stg(tp.pipe, 1, "residual", scale=1.0, rescale=0.5)
    try:
        alone = [_run(tp) for tp in tps]
        barrier = threading.Barrier(2, timeout=TIMEOUT)

        def interleave(pipe, i, t, kwargs):
            barrier.wait()  # both threads are inside their pipeline calls, at the same step
            return kwargs

        out, errors = {}, []

        def sample(k):
            try:
                out[k] = _run(tps[k], interleave)
            except BaseException as e:  # reported below, not lost in the thread
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=sample, args=(k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert not errors, errors
        for k in range(2):
            torch.testing.assert_close(out[k], alone[k], rtol=0, atol=0)
    finally:
        for tp in tps:
            stg_ext.remove_stg(tp.pipe)
