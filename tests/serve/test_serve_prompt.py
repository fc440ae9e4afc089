"""Multi-turn chat rendering: one user turn gives exactly build_video_prompt's ids."""

from __future__ import annotations

import pytest

from sparrow.api import prepare_video
from sparrow.errors import ConfigError
from sparrow.serve.prompt import Detokenizer
from sparrow.video.prompt import VIDEO_PART, build_video_prompt, render_chat, video_token_id


def _user(question: str, with_video: bool) -> dict:
    return {"role": "user",
            "content": ([VIDEO_PART] if with_video else []) + [{"type": "text", "text": question}]}


@pytest.mark.parametrize("with_video", [True, False])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_single_turn_equals_build_video_prompt(target, video_file, with_video, system):
    video = prepare_video(target, video_file(6), num_frames=6) if with_video else None
    messages = ([] if system is None else [{"role": "system", "content": system}])
    messages.append(_user("What moves?", with_video))
    ids = render_chat(target.tokenizer, target.config, messages, video)
    expected = build_video_prompt(target.tokenizer, target.config, video, "What moves?", system=system)
    assert ids.tolist() == expected.tolist()


def test_single_turn_without_chat_template_equals_build_video_prompt(target, video_file):
    video = prepare_video(target, video_file(4), num_frames=4)
    template = target.tokenizer.chat_template
    target.tokenizer.chat_template = None
    try:
        ids = render_chat(target.tokenizer, target.config, [_user("Why?", True)], video)
        expected = build_video_prompt(target.tokenizer, target.config, video, "Why?")
    finally:
        target.tokenizer.chat_template = template
    assert ids.tolist() == expected.tolist()


def test_follow_up_turns_keep_the_video_once_and_every_turn(target, video_file):
    video = prepare_video(target, video_file(4), num_frames=4)
    messages = [_user("What moves?", True), {"role": "assistant", "content": "A square."},
                _user("Which colour?", False)]
    ids = render_chat(target.tokenizer, target.config, messages, video)[0].tolist()
    assert ids.count(video_token_id(target.config)) == video.num_visual_tokens
    text = target.tokenizer.decode(ids)
    assert text.index("What moves?") < text.index("A square.") < text.index("Which colour?")
    single = render_chat(target.tokenizer, target.config, messages[:1], video)[0].tolist()
    assert ids[: len(single) - 3] == single[: len(single) - 3]  # a prefix, up to the assistant tag


def test_video_parts_must_match_the_video(target, video_file):
    video = prepare_video(target, video_file(4), num_frames=4)
    with pytest.raises(ConfigError, match="video parts"):
        render_chat(target.tokenizer, target.config, [_user("Hi", False)], video)
    with pytest.raises(ConfigError, match="video parts"):
        render_chat(target.tokenizer, target.config, [_user("Hi", True)], None)
    pad = target.tokenizer.convert_ids_to_tokens(video_token_id(target.config))
    with pytest.raises(ConfigError, match="placeholder"):
        render_chat(target.tokenizer, target.config, [_user(f"sneaky {pad}", False)], None)


def test_detokenizer_deltas_add_up_to_the_decoded_text(target):
    tokenizer = target.tokenizer
    ids = tokenizer("Hello, world! <|im_end|> and more", add_special_tokens=False)["input_ids"]
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.add(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    pieces.append(detokenizer.finish())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_stops_cut_the_text_at_the_same_token_however_tokens_arrive(target, chunk):
    tokenizer = target.tokenizer
    ids = tokenizer("Hello, world! and more words here", add_special_tokens=False)["input_ids"]

    def text(token_ids):
        return tokenizer.decode(token_ids, skip_special_tokens=True)

    full = text(ids)
    stop = full[8:14]  # spans several tokens
    first = next(n for n in range(1, len(ids) + 1) if stop in text(ids[:n]))
    detokenizer = Detokenizer(tokenizer, [stop, "never"])
    pieces = [detokenizer.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(detokenizer.finish())
    # nothing sent is taken back: the deltas add up to the text before the stop, exactly
    assert "".join(pieces) == full[: full.index(stop)]
    assert detokenizer.stopped_at == first
    by_token = Detokenizer(tokenizer, stop_token_ids=[ids[3]])
    cut = "".join(by_token.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)) + by_token.finish()
    assert cut == text(ids[:ids.index(ids[3])]) and by_token.stopped_at == ids.index(ids[3]) + 1
