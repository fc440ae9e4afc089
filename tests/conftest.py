"""Shared fixtures: tiny random models of every family and real video files. Functions the
test modules import live in `tests/helpers.py`."""

from __future__ import annotations

import functools

import pytest
import torch

from sparrow.targets.tiny import FAMILIES, processor_config, tiny_model, tiny_tokenizer
from tests.helpers import DEVICE, moving_square_frames

torch.set_num_threads(1)  # tiny models: threads only add overhead (and CI shares 2 cores)


@functools.cache
def _model(family: str, seed: int = 0):
    return tiny_model(family, seed).to(DEVICE)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def target(family):
    from sparrow.targets import wrap_model

    return wrap_model(_model(family), tiny_tokenizer(family), processor_config(family))


@pytest.fixture(scope="session")
def video_file(tmp_path_factory):
    """Factory: path of a real mp4 with `num_frames` frames (cached per frame count)."""
    from sparrow.video.io import write_video

    root = tmp_path_factory.mktemp("videos")
    cache: dict[tuple[int, int], str] = {}

    def make(num_frames: int = 8, seed: int = 0) -> str:
        if (num_frames, seed) not in cache:
            path = root / f"clip_{num_frames}_{seed}.mp4"
            write_video(path, moving_square_frames(num_frames, seed=seed), fps=8)
            cache[(num_frames, seed)] = str(path)
        return cache[(num_frames, seed)]

    return make
