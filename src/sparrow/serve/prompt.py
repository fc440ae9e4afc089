"""Text streamed token by token, cut at stop strings and stop tokens (conversations are
rendered by `sparrow.video.prompt.render_chat`)."""

from __future__ import annotations


class Detokenizer:
    """Turns tokens that arrive in pieces into text deltas whose concatenation is exactly
    `tokenizer.decode(all_tokens, skip_special_tokens=True)` at the end, or, with `stops` /
    `stop_token_ids`, that text up to the first stop string (excluded) or stop token
    (excluded), whichever comes first (OpenAI's `stop`; vLLM's `stop_token_ids`).

    Each step decodes everything so far and emits what is new; a trailing U+FFFD (a UTF-8
    character split across tokens) is held back until the next tokens complete it, and so is
    a tail that could be the start of a stop string. Once a stop is found, `stopped_at` is the
    number of tokens up to and including the one that completed it (the answer's tokens are
    cut there, so a stop lands on the same token whether tokens come one or several a call).
    """

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...] = (),
                 stop_token_ids: list[int] | tuple[int, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = [stop for stop in stops if stop]
        self.stop_token_ids = set(stop_token_ids)
        self.token_ids: list[int] = []
        self.sent = ""
        self.stopped_at: int | None = None

    def add(self, tokens: list[int]) -> str:
        if self.stopped_at is not None:
            return ""
        start = len(self.token_ids)
        self.token_ids += tokens
        for offset, token in enumerate(tokens):
            if token in self.stop_token_ids:  # the stop token ends the text, itself excluded
                self.stopped_at = start + offset + 1
                self.token_ids = self.token_ids[:self.stopped_at]
                return self._delta(self._text(self.token_ids[:-1]))
        text = self._text(self.token_ids)
        at = self._find(text)
        if at is not None:
            # the first token whose text completes the stop (decoding is prefix-stable)
            self.stopped_at = next(n for n in range(start + 1, len(self.token_ids) + 1)
                                   if self._find(self._text(self.token_ids[:n])) is not None)
            self.token_ids = self.token_ids[:self.stopped_at]
            return self._delta(text[:at])
        if text.endswith("\ufffd"):
            return ""
        return self._delta(text[:len(text) - self._held(text)])

    def finish(self) -> str:
        if self.stopped_at is not None:
            return ""
        text = self._text(self.token_ids)
        at = self._find(text)
        return self._delta(text if at is None else text[:at])

    def _text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _find(self, text: str) -> int | None:
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """Characters at the end of `text` that may be the start of a stop string."""
        for size in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(stop.startswith(text[-size:]) for stop in self.stops):
                return size
        return 0

    def _delta(self, text: str) -> str:
        # A decode that rewrote earlier text (rare merges) cannot be unsent: send what follows.
        delta = text[len(self.sent):]
        self.sent += delta
        return delta
