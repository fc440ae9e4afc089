"""The held-out split and the data-size subsets: fixed functions of the samples' keys."""

from __future__ import annotations

import torch

from sparrow.training.data import Sample, split, subset


def _samples(n: int, video_from: int) -> list[Sample]:
    """n samples in prompt order, text-only ones first (as datagen stores them)."""
    empty = torch.zeros(0, 4)
    return [Sample(input_ids=torch.zeros(3, dtype=torch.long), loss_mask=torch.ones(3, dtype=torch.bool),
                   visual_mask=torch.full((3,), i >= video_from), last=torch.zeros(3, 4), mid=empty,
                   embed=empty, key=f"data/{i}") for i in range(n)]


def test_subsets_are_nested_and_mix_the_prompt_kinds_like_the_whole():
    samples = _samples(400, video_from=100)  # a quarter text-only
    train, held = split(samples, 0.1, seed=0)
    assert 20 < len(held) < 60 and {s.key for s in train}.isdisjoint(s.key for s in held)
    small, large = subset(train, 80, seed=0), subset(train, 200, seed=0)
    assert len(small) == 80 and len(large) == 200
    assert {s.key for s in small} <= {s.key for s in large}
    keys = [s.key for s in small]
    assert [s.key for s in subset(train, 80, seed=0)] == keys  # a fixed function of the keys
    assert [s.key for s in subset(train, 80, seed=1)] != keys
    assert subset(train, None, seed=0) is train and subset(train, 10_000, seed=0) is train
    text_share = sum(not s.has_video for s in small) / len(small)
    assert 0.1 < text_share < 0.4  # the first 80 in prompt order would be all text-only
