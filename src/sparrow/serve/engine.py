"""One generation at a time, on one worker thread, fed by a bounded FIFO queue.

The target and the draft hold one KV cache each, so generations cannot overlap: requests wait
in arrival order (fair: first come, first served) and a full queue is refused at once (429).
A job asks for `n` answers (choices) to one prompt, generated one after the other; the second
and later ones reuse the first one's prefilled prompt (`target.snapshot()`), and with a seed,
choice i samples with seed + i. A job reports through its `sink` (called on the worker
thread): ("tokens", Piece) as each target call emits tokens, ("done", (index, result)) as
each choice ends, until all n have; or it ends early with one of ("timeout", None),
("cancelled", None) or ("error", exception). Setting `job.cancel` (client gone) or passing
`job.deadline` stops the generation at its next target call.

With a `PrefixCache`, a job with a video looks up its `video_key` (content hash + frame
settings) first: a hit prefills only the part of the prompt after the cached one (a follow-up
question pays no video prefill); afterwards the job's own prompt state is stored.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from sparrow.draft import DraftModel
from sparrow.errors import SparrowError
from sparrow.serve.prefix_cache import PrefixCache
from sparrow.serve.prompt import Detokenizer
from sparrow.speculative.generate import GenerationResult, TokenLogprob, generate
from sparrow.speculative.sampling import SamplingParams
from sparrow.speculative.tree import DEFAULT_TREE, TreeSpec, parse_tree
from sparrow.targets import TargetAdapter
from sparrow.video.processing import VideoInputs

log = logging.getLogger("sparrow.serve")


class QueueFull(Exception):
    """The request queue is at its bound."""


@dataclass
class Piece:
    """Tokens one target call emitted for choice `index`, with their logprobs if asked for."""

    index: int
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationJob:
    input_ids: torch.Tensor  # (1, L) prompt ids, visual placeholders expanded
    video: VideoInputs | None
    max_new_tokens: int
    sampling: SamplingParams
    deadline: float  # time.monotonic() after which the job stops (timeout)
    sink: Callable[[str, object], None]
    video_key: str | None = None  # sha256 of the video + frame settings (prefix-cache key)
    cancel: threading.Event = field(default_factory=threading.Event)
    stops: tuple[str, ...] = ()  # the answer ends before the first of these strings...
    stop_token_ids: tuple[int, ...] = ()  # ...or before one of these tokens (serve/prompt.py)
    n: int = 1  # answers to generate (choices)
    logprobs: int | None = None  # record each token's logprob and this many alternatives


@dataclass
class EngineStats:
    completed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    rejected: int = 0  # queue full
    runs: int = 0  # jobs the worker started generating
    generation_s: float = 0.0  # seconds it spent on them
    prompt_tokens: int = 0  # of the completed ones, and what they produced:
    completion_tokens: int = 0
    target_calls: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0


class Engine:
    """The single worker. `generate_fn` defaults to sparrow's decoding loop (tests inject a
    scripted one to control timing)."""

    def __init__(
        self,
        target: TargetAdapter,
        draft: DraftModel | None = None,
        method: str = "ar",
        tree: TreeSpec | str = DEFAULT_TREE,
        max_queue: int = 64,
        generate_fn: Callable = generate,
        prefix_cache: PrefixCache | None = None,
    ):
        self.target, self.draft, self.method = target, draft, method
        self.prefix_cache = prefix_cache
        self.tree = parse_tree(tree) if isinstance(tree, str) else tree
        self.generate_fn = generate_fn
        self.stats = EngineStats()
        self._queue: queue.Queue[GenerationJob | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="sparrow-engine", daemon=True)
        self.busy = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running job, drop the waiting ones (as cancelled), end the thread."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.sink("cancelled", None)
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the queue ahead times the mean job so far."""
        mean = self.stats.generation_s / self.stats.runs if self.stats.runs else 1.0
        return max(1, math.ceil(mean * (self.queued + 1)))

    def submit(self, job: GenerationJob) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats.rejected += 1
            raise QueueFull from None

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            self.busy = True
            try:
                self._run(job)
            finally:
                self.busy = False

    def _run(self, job: GenerationJob) -> None:
        if job.cancel.is_set():
            self.stats.cancelled += 1
            job.sink("cancelled", None)
            return
        if time.monotonic() >= job.deadline:
            self.stats.timed_out += 1
            job.sink("timeout", None)
            return

        started = time.monotonic()
        stats, prefix = self.stats, None
        try:
            for index in range(job.n):
                result, snapshot = self._choice(job, index, prefix)
                if result.finish_reason == "stopped":
                    if job.cancel.is_set():
                        stats.cancelled += 1
                        job.sink("cancelled", None)
                    else:
                        stats.timed_out += 1
                        job.sink("timeout", None)
                    return
                if index == 0 and job.n > 1:  # the later choices start from this prompt
                    prefix = snapshot or self.target.snapshot()
                stats.prompt_tokens += result.num_prompt_tokens if index == 0 else 0
                stats.completion_tokens += len(result.token_ids)
                stats.target_calls += result.target_calls
                stats.prefill_s += result.timings.prefill_s
                stats.decode_s += result.timings.decode_s
                stats.completed += index == job.n - 1
                job.sink("done", (index, result))
        except Exception as error:  # reported to the client; the worker keeps serving
            if not isinstance(error, SparrowError):
                log.exception("generation failed")
            stats.failed += 1
            job.sink("error", error)
        finally:
            stats.runs += 1
            stats.generation_s += time.monotonic() - started

    def _choice(self, job: GenerationJob, index: int, prefix) -> tuple[GenerationResult, object]:
        """One answer, cut at its stop (finish_reason "stopped" when cancelled or timed out),
        and the prompt state the prefix cache stored (None if it stored none)."""
        text = Detokenizer(self.target.tokenizer, job.stops, job.stop_token_ids) \
            if job.stops or job.stop_token_ids else None

        def on_tokens(tokens: list[int], logprobs: list[TokenLogprob] | None) -> bool:
            job.sink("tokens", Piece(index, tokens, logprobs))
            if text is not None:
                text.add(tokens)
                if text.stopped_at is not None:
                    return True
            return job.cancel.is_set() or time.monotonic() >= job.deadline

        sampling = job.sampling
        if sampling.seed is not None:
            sampling = replace(sampling, seed=sampling.seed + index)
        result, snapshot = self._generate(job, on_tokens, sampling, prefix)
        if text is not None and text.stopped_at is not None:
            # a call emits several tokens: the answer ends at the one that completed the stop
            cut = text.stopped_at
            result = replace(result, token_ids=result.token_ids[:cut], finish_reason="stop",
                             logprobs=None if result.logprobs is None else result.logprobs[:cut])
        return result, snapshot

    def _generate(self, job: GenerationJob, on_tokens, sampling, prefix):
        caching = prefix is None and self.prefix_cache is not None and job.video_key is not None
        extra = {}
        if prefix is not None:
            extra["prefix"] = prefix
        elif caching and (cached := self.prefix_cache.get(job.video_key)) is not None:
            extra["prefix"] = cached
        result = self.generate_fn(
            self.target,
            job.input_ids,
            job.video,
            method=self.method,
            draft=self.draft,
            tree=self.tree,
            max_new_tokens=job.max_new_tokens,
            sampling=sampling,
            on_tokens=on_tokens,
            logprobs=job.logprobs,
            eos_token_ids=sorted(set(self.target.eos_token_ids) | set(job.stop_token_ids)),
            **extra,
        )
        snapshot = None
        if caching:
            snapshot = self.target.snapshot()
            self.prefix_cache.put(job.video_key, snapshot)
        return result, snapshot
