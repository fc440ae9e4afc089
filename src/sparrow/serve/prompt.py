"""Chat prompts of several turns, and text streamed token by token.

`render_chat` is `sparrow.video.prompt.build_video_prompt` generalised to a conversation:
system / user / assistant turns rendered through the chat template, with the video placeholder
where the (single) video part sits, then expanded to the family's visual tokens exactly as
build_video_prompt does. For one user turn (video first, then the question) and an optional
system message it gives build_video_prompt's ids; tests/test_serve_prompt.py checks it.
"""

from __future__ import annotations

import torch

from sparrow.errors import ConfigError
from sparrow.video.processing import VideoInputs, model_family
from sparrow.video.prompt import _placeholder_text, _video_tokens, video_token_id

VIDEO_PART = {"type": "video"}


def render_chat(
    tokenizer,
    model_config,
    messages: list[dict],
    video: VideoInputs | None,
    chat_template: str | None = None,
) -> torch.Tensor:
    """Input ids (1, L) of `messages` plus the generation prompt.

    `messages` use the template form: {"role": ..., "content": str or a list of
    {"type": "text", "text": ...} / {"type": "video"} parts}; at most one video part, and
    `video` holds its frames (None when there is no video part).
    """
    family = model_family(model_config)
    placeholder_id = video_token_id(model_config)
    video_parts = sum(
        1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p == VIDEO_PART
    )
    if video_parts != (0 if video is None else 1):
        raise ConfigError(f"the conversation holds {video_parts} video parts; give at most one video")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    else:  # build_video_prompt's plain form: the turns' contents, one per line
        placeholder = _placeholder_text(tokenizer, model_config, family)
        pieces = []
        for message in messages:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            pieces += [placeholder if p == VIDEO_PART else p["text"] for p in parts]
        text = "\n".join(pieces)
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    found = ids.count(placeholder_id)
    if found != video_parts:
        raise ConfigError(
            f"the prompt holds {found} video placeholder tokens, expected {video_parts}; "
            "keep the model's video token out of the text"
        )
    if video is not None:
        at = ids.index(placeholder_id)
        ids = (
            ids[:at]
            + _video_tokens(tokenizer, model_config, family, video, placeholder_id)
            + ids[at + 1 :]
        )
    return torch.tensor([ids], dtype=torch.long)  # (1, L)


class Detokenizer:
    """Turns tokens that arrive in pieces into text deltas whose concatenation is exactly
    `tokenizer.decode(all_tokens, skip_special_tokens=True)` at the end.

    Each step decodes everything so far and emits what is new; a trailing U+FFFD (a UTF-8
    character split across tokens) is held back until the next tokens complete it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.sent = ""

    def add(self, tokens: list[int]) -> str:
        self.token_ids += tokens
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        return self._delta(text)

    def finish(self) -> str:
        return self._delta(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))

    def _delta(self, text: str) -> str:
        # A decode that rewrote earlier text (rare merges) cannot be unsent: send what follows.
        delta = text[len(self.sent):]
        self.sent += delta
        return delta
