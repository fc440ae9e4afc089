"""Text streamed token by token (conversations are rendered by
`sparrow.video.prompt.render_chat`)."""

from __future__ import annotations


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
