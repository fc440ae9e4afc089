"""Fractional video positions (`sparrow_video_position_step`, the reference target's scheme):
visual tokens advance the rotary position by a step < 1; decoding stays lossless against
transformers' own generate given the same prompt positions, prefixes reuse exactly, and models
without the attribute keep plain integer positions."""

from __future__ import annotations

import pytest
import torch

from sparrow.api import prepare_video
from sparrow.draft import init_draft
from sparrow.speculative.generate import generate
from sparrow.targets import wrap_model
from sparrow.targets.llava import VIDEO_POSITION_STEP, prompt_positions, video_position_step
from sparrow.targets.tiny import processor_config, tiny_model, tiny_tokenizer
from sparrow.video.prompt import build_video_prompt
from tests.helpers import reference_generate

STEP = 0.25


def _target(step: float | None):
    model = tiny_model("llava_onevision")
    if step is not None:
        setattr(model.config, VIDEO_POSITION_STEP, step)
    return wrap_model(model, tiny_tokenizer("llava_onevision"), processor_config("llava_onevision"))


@pytest.fixture(scope="module")
def stepped():
    return _target(STEP)


def test_positions_advance_by_the_step_over_visual_tokens_only():
    v = 7
    ids = torch.tensor([1, 2, v, v, v, v, 3, 4])
    positions, offset = prompt_positions(ids, v, 0.25)
    assert positions.dtype == torch.float32 and positions.shape == (1, 8)
    assert positions[0].tolist() == [0, 1, 2, 2.25, 2.5, 2.75, 3, 4]
    assert offset == -3.0  # slot 8 (the first answer token) sits at position 5
    plain, zero = prompt_positions(ids, v, 1.0)
    assert plain.dtype == torch.int64 and plain[0].tolist() == list(range(8)) and zero == 0


def test_the_step_is_read_from_the_config_and_checked():
    config = tiny_model("llava_onevision").config
    assert video_position_step(config) == 1.0  # plain LLaVA checkpoints: unchanged
    setattr(config, VIDEO_POSITION_STEP, 0.25)
    assert video_position_step(config) == 0.25
    for bad in (0, -0.5, 1.5, 0.3):  # 0.3: not a multiple of 1/256, positions would round
        setattr(config, VIDEO_POSITION_STEP, bad)
        with pytest.raises(ValueError, match=VIDEO_POSITION_STEP):
            video_position_step(config)


def test_the_step_changes_what_the_model_computes(stepped, video_file):
    plain = _target(None)
    video = prepare_video(plain, video_file(8), num_frames=8)
    ids = build_video_prompt(plain.tokenizer, plain.config, video, "What happens?")
    a, b = plain.prefill(ids, video), stepped.prefill(ids, video)
    visual = int(a.visual_mask.sum())
    assert stepped.position_offset == -0.75 * visual and plain.position_offset == 0
    assert not torch.allclose(a.logits, b.logits)


@pytest.mark.parametrize("frames", [4, 8])
def test_greedy_speculative_equals_generate_with_fractional_positions(stepped, video_file, frames):
    video = prepare_video(stepped, video_file(frames), num_frames=frames)
    for prompt in ("What happens in the video?", "Describe the colours, then count the objects."):
        ids = build_video_prompt(stepped.tokenizer, stepped.config, video, prompt)
        reference = reference_generate(stepped, ids, video, 24, stepped.eos_token_ids)
        assert len(reference) == 24
        for method in ("ar", "sparrow", "eagle"):
            draft = None if method == "ar" else init_draft(stepped, method, seed=frames)
            for tree in ("2-1-1", "30-4-8") if method != "ar" else ("2-1-1",):
                result = generate(stepped, ids, video, method=method, draft=draft, tree=tree,
                                  max_new_tokens=24)
                assert result.token_ids == reference, (method, tree, prompt)


def test_follow_up_question_reuses_the_prefix_with_fractional_positions(stepped, video_file):
    video = prepare_video(stepped, video_file(8), num_frames=8)
    first = build_video_prompt(stepped.tokenizer, stepped.config, video, "What colour is it?")
    generate(stepped, first, video, max_new_tokens=6)
    state = stepped.snapshot()
    assert state.position_offset < 0
    second = build_video_prompt(stepped.tokenizer, stepped.config, video, "Where does it go next?")
    draft = init_draft(stepped, "sparrow")
    for d in (None, draft):
        cold = generate(stepped, second, video, method="ar" if d is None else "sparrow", draft=d,
                        max_new_tokens=20)
        warm = generate(stepped, second, None, method="ar" if d is None else "sparrow", draft=d,
                        max_new_tokens=20, prefix=state)
        assert warm.token_ids == cold.token_ids
