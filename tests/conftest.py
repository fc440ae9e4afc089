"""Shared fixtures: tiny random models of every family, real video files, reference outputs."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from sparrow.targets.llava import prompt_positions, video_position_step
from sparrow.testing import FAMILIES, processor_config, tiny_model, tiny_tokenizer

torch.set_num_threads(1)  # tiny models: threads only add overhead (and CI shares 2 cores)
# The suite runs on the CPU; SPARROW_TEST_DEVICE=cuda reruns it on a GPU (never needed by CI).
DEVICE = torch.device(os.environ.get("SPARROW_TEST_DEVICE", "cpu"))


def moving_square_frames(num_frames: int, height: int = 72, width: int = 96, seed: int = 0):
    """(T, H, W, 3) uint8: a coloured square moving over a noisy background."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 60, size=(num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        x = (5 * t) % (width - 20)
        frames[t, 20:40, x : x + 20] = (200, 40 + 10 * seed, 40)
    return frames


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


def reference_generate(target, input_ids, video, max_new_tokens: int, eos_token_ids) -> list[int]:
    """transformers' own greedy generate on the unmodified model (fresh default attention)."""
    model = target.model
    input_ids = input_ids.to(model.device)
    kwargs = {}
    if video is not None:
        kwargs.update({k: v.to(model.device) for k, v in video.model_kwargs().items()})
    if "qwen" in model.config.model_type:
        from sparrow.video.prompt import mm_token_type_ids

        kwargs["mm_token_type_ids"] = mm_token_type_ids(input_ids, model.config)
    elif video_position_step(model.config) != 1:  # transformers takes them; it numbers on by 1
        kwargs["position_ids"] = prompt_positions(input_ids, target.video_token_id(),
                                                  video_position_step(model.config))[0].to(model.device)
    text_config = model.config.get_text_config()
    attention = text_config._attn_implementation
    text_config._attn_implementation = "sdpa"  # the reference runs transformers' own kernel
    try:
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(eos_token_ids),
            pad_token_id=0,
            **kwargs,
        )
    finally:
        text_config._attn_implementation = attention
    return out[0, input_ids.shape[1] :].tolist()


def assert_text_answers_match(target, language_model, max_new_tokens: int = 24) -> None:
    """Text-only greedy answers of a video `target` (our loop) equal `language_model.generate`'s."""
    from sparrow.decoding.generate import generate
    from sparrow.video.prompt import build_video_prompt

    for question in ("What colour is the sky?", "Name three fruits."):
        ids = build_video_prompt(target.tokenizer, target.config, None, question)
        ours = generate(target, ids, max_new_tokens=max_new_tokens).token_ids
        with torch.no_grad():
            theirs = language_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        assert ours == theirs[0, ids.shape[1]:].tolist(), question
