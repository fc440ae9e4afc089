"""Follow-up questions reuse a video's prefilled state and answer exactly as a cold run."""

from __future__ import annotations

import pytest

from sparrow.api import prepare_video
from sparrow.draft import init_draft
from sparrow.speculative.generate import generate
from sparrow.video.prompt import build_video_prompt


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_follow_up_question_reuses_the_video_prefix(target, video_file):
    video = prepare_video(target, video_file(8), num_frames=8)
    first = build_video_prompt(target.tokenizer, target.config, video, "What colour is it?")
    generate(target, first, video, max_new_tokens=6)
    state = target.snapshot()
    second = build_video_prompt(target.tokenizer, target.config, video, "Where does it go next?")
    reused = state.common_length(second[0])
    visual = (second[0] == target.video_token_id()).nonzero()
    assert int(visual[-1]) < reused < second.shape[1]  # the whole video is reused
    draft = init_draft(target, "sparrow")
    for method in ("ar", "sparrow"):
        d = None if method == "ar" else draft
        cold = generate(target, second, video, method=method, draft=d, max_new_tokens=20)
        warm = generate(target, second, None, method=method, draft=d, max_new_tokens=20,
                        prefix=state)
        assert warm.token_ids == cold.token_ids
        assert warm.num_visual_tokens == cold.num_visual_tokens
        assert warm.draft_cache_length == cold.draft_cache_length
    # The same question again is a full hit (all but the last prompt token reused).
    again = generate(target, first, None, max_new_tokens=6, prefix=state)
    assert again.token_ids == generate(target, first, video, max_new_tokens=6).token_ids


def test_a_different_video_is_not_reused(target, video_file):
    video = prepare_video(target, video_file(4), num_frames=4)
    ids = build_video_prompt(target.tokenizer, target.config, video, "What?")
    generate(target, ids, video, max_new_tokens=2)
    state = target.snapshot()
    other = prepare_video(target, video_file(8), num_frames=8)
    other_ids = build_video_prompt(target.tokenizer, target.config, other, "What?")
    cold = generate(target, other_ids, other, max_new_tokens=8).token_ids
    # The prompts share only their start, before the video: the state must not be used.
    assert generate(target, other_ids, other, max_new_tokens=8, prefix=state).token_ids == cold


def test_same_layout_other_pixels_is_not_reused(video_file):
    from sparrow.targets import load_target
    from sparrow.targets.base import video_fingerprint

    target = load_target("tiny:llava_onevision")
    video = prepare_video(target, video_file(4, seed=0), num_frames=4)
    other = prepare_video(target, video_file(4, seed=1), num_frames=4)
    ids = build_video_prompt(target.tokenizer, target.config, video, "What?")
    assert ids.equal(build_video_prompt(target.tokenizer, target.config, other, "What?"))
    generate(target, ids, video, max_new_tokens=2)
    state = target.snapshot()
    assert state.video_fingerprint != video_fingerprint(other)
    cold = generate(target, ids, other, max_new_tokens=12).token_ids

    def must_not_reuse(*args, **kwargs):
        raise AssertionError("a prefix made from other pixels was reused")

    target._prefill_from = must_not_reuse
    assert generate(target, ids, other, max_new_tokens=12, prefix=state).token_ids == cold


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_a_prefix_keeps_the_layer_states_a_draft_reads(target, video_file):
    """A prompt prefilled with `layers` keeps those layers' states in its snapshot: a follow-up
    reuses them (the states equal a cold prefill's, the answer of an eagle-mode draft that reads
    them too); a prefix without them is not used for a prefill that needs them."""
    import torch

    video = prepare_video(target, video_file(8), num_frames=8)
    first = build_video_prompt(target.tokenizer, target.config, video, "What colour is it?")
    second = build_video_prompt(target.tokenizer, target.config, video, "Where does it go next?")
    layers = (0, 2)
    target.prefill(first, video, layers=layers)
    state = target.snapshot()
    assert set(state.layer_hidden) == set(layers)
    cold = target.prefill(second, video, layers=layers)
    cold_states = {m: h.clone() for m, h in cold.layer_hidden.items()}
    warm = target.prefill(second, video, layers=layers, prefix=state)
    assert warm.input_ids.shape == cold.input_ids.shape
    for m in layers:
        torch.testing.assert_close(warm.layer_hidden[m], cold_states[m], rtol=1e-4, atol=1e-5)
    draft = init_draft(target, "eagle", visual="mid", mid_layer=2)
    expected = generate(target, second, video, method="eagle", draft=draft, max_new_tokens=12)
    reused = generate(target, second, video, method="eagle", draft=draft, max_new_tokens=12, prefix=state)
    assert reused.token_ids == expected.token_ids
    target.prefill(first, video)  # no layers kept: the prefix cannot serve a draft that needs one
    bare = target.snapshot()
    assert bare.layer_hidden == {}
    again = generate(target, second, video, method="eagle", draft=draft, max_new_tokens=12, prefix=bare)
    assert again.token_ids == expected.token_ids
