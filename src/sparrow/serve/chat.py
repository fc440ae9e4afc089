"""`sparrow chat`: an interactive conversation about one video in the terminal.

Questions come from stdin, one a line, until end of input or `/quit`; each answer streams as
the target emits it, then a line with tau and timings. Follow-up questions see the whole
conversation (rendered through the chat template); each question reuses the previous
prompt's prefilled state, so the video's prefill is paid once, by the first question.
"""

from __future__ import annotations

import sys
from typing import TextIO

from sparrow.draft import DraftModel
from sparrow.options import DEFAULT_MAX_NEW_TOKENS
from sparrow.serve.prompt import Detokenizer
from sparrow.speculative.generate import generate
from sparrow.speculative.sampling import SamplingParams
from sparrow.speculative.tree import DEFAULT_TREE, TreeSpec
from sparrow.targets import TargetAdapter
from sparrow.video.processing import VideoInputs
from sparrow.video.prompt import VIDEO_PART, render_chat

QUIT = "/quit"


def chat(
    target: TargetAdapter,
    video: VideoInputs | None,
    *,
    method: str = "ar",
    draft: DraftModel | None = None,
    tree: TreeSpec | str = DEFAULT_TREE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    sampling: SamplingParams | None = None,
    system: str | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
) -> list[dict]:
    """Run the conversation; returns its messages (template form, answers included)."""
    sampling = sampling or SamplingParams()
    messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
    prefix = None  # the last prompt's prefilled state (see TargetAdapter.snapshot)
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == QUIT:
            break
        question = line.strip()
        if not question:
            continue
        first_turn = not any(m["role"] == "user" for m in messages)
        parts = ([VIDEO_PART] if video is not None and first_turn else [])
        messages.append({"role": "user", "content": parts + [{"type": "text", "text": question}]})
        input_ids = render_chat(target.tokenizer, target.config, messages, video)
        detokenizer = Detokenizer(target.tokenizer)

        def show(tokens: list[int], _logprobs, detokenizer=detokenizer) -> bool:
            stdout.write(detokenizer.add(tokens))
            stdout.flush()
            return False

        result = generate(target, input_ids, video, method=method, draft=draft, tree=tree,
                          max_new_tokens=max_new_tokens, sampling=sampling, on_tokens=show,
                          prefix=prefix)
        prefix = target.snapshot()  # the next question starts with this whole prompt
        stdout.write(detokenizer.finish() + "\n")
        stdout.flush()
        answer = target.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        t = result.timings
        print(f"[{method}] tau {result.tau:.2f}, {len(result.token_ids)} tokens, "
              f"{result.target_calls} target calls, prefill {t.prefill_s:.2f}s, "
              f"decode {t.decode_s:.2f}s", file=stderr, flush=True)
    return messages
