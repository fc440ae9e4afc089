"""The target's log-probabilities (`generate(logprobs=k)`) in OpenAI's two response shapes.

    chat_logprobs         chat.completion's `logprobs.content`: token, logprob, bytes, top_logprobs
    completion_logprobs   text_completion's `logprobs`: tokens, token_logprobs, top_logprobs, text_offset

A token's text is what the tokenizer decodes it to alone. A byte-level BPE token that holds
part of a UTF-8 character decodes to U+FFFD; its `bytes` are then its own raw bytes, so a
client that joins the bytes gets the exact text back (OpenAI's reason for the field).
The logprobs cover every token of the answer's `token_ids` (the ones `usage` counts): the
stop token or the token that completed a stop string included, though the text leaves it out.
"""

from __future__ import annotations

from functools import cache

from sparrow.speculative.generate import TokenLogprob


@cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): each byte is written as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text and its UTF-8 bytes (the raw bytes of a byte-level piece that is not
    whole characters)."""
    text = tokenizer.decode([token])
    if "\ufffd" in text:
        piece = tokenizer.convert_ids_to_tokens(token) or ""
        table = _byte_of_char()
        if piece and all(char in table for char in piece):
            return text, [table[char] for char in piece]
    return text, list(text.encode("utf-8"))


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text, raw = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**entry(item.token, item.logprob),
                         "top_logprobs": [entry(token, logprob) for token, logprob in item.top]}
                        for item in logprobs],
            "refusal": None}


def completion_logprobs(tokenizer, logprobs: list[TokenLogprob], offset: int = 0) -> dict:
    """`text_offset`: where each token's text starts in the concatenation of the answer's
    token texts (special tokens included, so it can run ahead of the answer's text);
    `offset` is where these tokens start (a stream's later chunks)."""
    tokens, offsets = [], []
    for item in logprobs:
        text, _ = token_text(tokenizer, item.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [item.logprob for item in logprobs],
            "top_logprobs": [{token_text(tokenizer, token)[0]: logprob for token, logprob in item.top}
                             for item in logprobs],
            "text_offset": offsets}
