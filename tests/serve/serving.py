"""Helpers for tests of the server: a served app in a context manager, and a scripted
generation that emits tokens at a set pace (to test queueing, timeouts and cancellation
without depending on how fast a model runs)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from sparrow.serve.app import ServeSettings, create_app
from sparrow.serve.engine import Engine
from sparrow.serve.server import BackgroundServer
from sparrow.speculative.generate import GenerationResult


@contextmanager
def serving(target, draft=None, *, method: str = "ar", tree="10-3-4", max_queue: int = 64,
            generate_fn=None, prefix_cache=None, **settings):
    """Serve `target` on 127.0.0.1 at a free port; yields (base url, engine)."""
    settings.setdefault("model_id", "tiny")
    kwargs = {} if generate_fn is None else {"generate_fn": generate_fn}
    engine = Engine(target, draft, method=method, tree=tree, max_queue=max_queue,
                    prefix_cache=prefix_cache, **kwargs)
    with BackgroundServer(create_app(engine, ServeSettings(**settings))) as server:
        yield server.url, engine


class ScriptedGenerate:
    """A stand-in for `generate`: emits the token `token_id` every `step_s` seconds, up to
    max_new_tokens, honouring on_tokens' stop; `gate` (if set) holds the first token back
    until released. `calls` counts generations started, `stopped` those stopped early."""

    def __init__(self, token_id: int, step_s: float = 0.01, gate: threading.Event | None = None):
        self.token_id, self.step_s, self.gate = token_id, step_s, gate
        self.calls = 0
        self.stopped = 0

    def __call__(self, target, input_ids, video=None, *, max_new_tokens, on_tokens=None, **_):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(30)
        emitted, finish = [], "length"
        while len(emitted) < max_new_tokens:
            time.sleep(self.step_s)
            emitted.append(self.token_id)
            if on_tokens is not None and on_tokens([self.token_id], None):
                finish = "stopped"
                self.stopped += 1
                break
        return GenerationResult(
            token_ids=emitted, method="ar", num_prompt_tokens=int(input_ids.shape[1]),
            num_visual_tokens=0, target_calls=len(emitted), accepted_lengths=[1] * len(emitted),
            finish_reason=finish,
        )
