"""The shipped world classifier (stg-ext eval's judge) reads real clips it never saw."""
from __future__ import annotations

import torch

from stg_ext.world import classifier as wc


def test_shipped_classifier_reads_unseen_real_clips():
    torch.set_num_threads(1)
    model = wc.load(wc.CLASSIFIER_PATH)
    acc = wc.accuracy(model, n=128, seed_base=wc.REFERENCE_SEED_BASE + 700_000)
    assert min(acc.values()) >= 0.9, acc
    x, _ = wc.real_batch(range(wc.REFERENCE_SEED_BASE, wc.REFERENCE_SEED_BASE + 4))
    assert model.features(x).shape == (4, wc.FEATURES)


def test_training_and_reference_seeds_are_disjoint():
    # The classifier trains on TRAIN_SEED_BASE + step * batch + i for its 800 x 32 clips.
    assert wc.TRAIN_SEED_BASE + 800 * 32 < wc.REFERENCE_SEED_BASE
