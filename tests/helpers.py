"""Helpers shared by the test modules: a synthetic video, transformers' own greedy answers (the
oracle every losslessness test compares against), and text-answer agreement."""

from __future__ import annotations

import os

import numpy as np
import torch

from sparrow.targets.llava import prompt_positions, video_position_step

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


def reference_generate(target, input_ids, video, max_new_tokens: int, eos_token_ids) -> list[int]:
    """transformers' own greedy `generate` on the model as the user gave it: run inside
    `target.unwrapped()`, so its own attention implementation and plain linears answer."""
    out = _transformers_generate(target, input_ids, video, max_new_tokens=max_new_tokens,
                                 eos_token_id=list(eos_token_ids))
    return out[0, input_ids.shape[1] :].tolist()


def reference_logits(target, input_ids, video, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V) float32: transformers' raw logits (`output_logits`, before any
    processing) at each position of an answer forced to `tokens` (a sampled one, say)."""
    start = input_ids.shape[1]

    def forced(batch, ids):
        return [tokens[len(ids) - start]]

    out = _transformers_generate(target, input_ids, video, max_new_tokens=len(tokens), eos_token_id=None,
                                 prefix_allowed_tokens_fn=forced, output_logits=True,
                                 return_dict_in_generate=True)
    assert out.sequences[0, start:].tolist() == tokens
    return torch.stack([step[0] for step in out.logits]).float()


def _transformers_generate(target, input_ids, video, **settings):
    input_ids = input_ids.to(target.device)
    kwargs = {}
    if video is not None:
        kwargs.update({k: v.to(target.device) for k, v in video.model_kwargs().items()})
    if "qwen" in target.config.model_type:
        from sparrow.video.prompt import mm_token_type_ids

        kwargs["mm_token_type_ids"] = mm_token_type_ids(input_ids, target.config)
    elif video_position_step(target.config) != 1:  # transformers takes them; it numbers on by 1
        step = video_position_step(target.config)
        kwargs["position_ids"] = prompt_positions(input_ids, target.video_token_id(), step)[0].to(
            target.device)
    with target.unwrapped() as model:
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                              pad_token_id=0, **settings, **kwargs)


def assert_text_answers_match(target, language_model, max_new_tokens: int = 24) -> None:
    """Text-only greedy answers of a video `target` (our loop) equal `language_model.generate`'s."""
    from sparrow.speculative.generate import generate
    from sparrow.video.prompt import build_video_prompt

    for question in ("What colour is the sky?", "Name three fruits."):
        ids = build_video_prompt(target.tokenizer, target.config, None, question)
        ours = generate(target, ids, max_new_tokens=max_new_tokens).token_ids
        with torch.no_grad():
            theirs = language_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        assert ours == theirs[0, ids.shape[1]:].tolist(), question
