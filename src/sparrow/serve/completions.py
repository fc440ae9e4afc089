"""POST /v1/chat/completions and POST /v1/completions, one request from top to bottom.

    answer_request     read the body, check it, prepare the engine's inputs, submit the job
    next_event         the engine's next event for the request, or 504 / client gone
    complete_json      the whole answer as one chat.completion / text_completion (stream: false)
    stream_events      the answer as SSE chat.completion.chunk / text_completion events (stream: true)

The engine reports on its own thread through the job's sink; `post_event` hands each event
to the request's asyncio queue, and the request waits on that queue while watching its
deadline and its client. A timeout answers 504 (or, once a stream has started, ends it with
an error event and no `[DONE]`); a client that disconnects stops its generation (and is
logged as 499 if it left before the answer began).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from sparrow.errors import SparrowError
from sparrow.serve.engine import Engine, GenerationJob, Piece, QueueFull
from sparrow.serve.errors import ApiError, timed_out, validation_message
from sparrow.serve.logprobs import chat_logprobs, completion_logprobs
from sparrow.serve.media import MediaError
from sparrow.serve.prepare import Prepared, prepare_request
from sparrow.serve.prompt import Detokenizer
from sparrow.serve.schemas import IGNORED_FIELDS, ChatCompletionRequest, CompletionRequest, GenerationRequest
from sparrow.speculative.generate import GenerationResult

if TYPE_CHECKING:  # app.py imports this module: the settings type is for annotations only
    from sparrow.serve.app import ServeSettings

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
MAX_JSON_DEPTH = 32  # a chat body needs 7 (body, messages, message, parts, part, video_url, url)
POLL_S = 0.25  # how often a waiting request checks whether its client is still there

# The statuses the endpoint answers, for the OpenAPI document.
RESPONSES = {
    200: {"description": "a chat.completion object, or an SSE stream of chat.completion.chunk"},
    400: {"description": "invalid request"}, 401: {"description": "missing or wrong API key"},
    403: {"description": "video path outside the media roots"},
    404: {"description": "unknown model"}, 413: {"description": "request body too large"},
    429: {"description": "queue full"}, 504: {"description": "request timed out"},
}


class ClientGone(Exception):
    """The client disconnected while its request was waiting or generating."""


@dataclass
class InFlight:
    """One request the engine has accepted, from submission to its last event."""

    job: GenerationJob  # job.deadline: arrival + timeout_s; job.cancel stops the generation
    events: asyncio.Queue  # (kind, payload) from the engine, in order (see engine.py)
    client: Request  # polled for disconnection
    model: str  # the model id the answer is labelled with
    timeout_s: float  # for the 504's message
    chat: bool = True  # a chat.completion, or (/v1/completions) a text_completion
    completion_id: str = ""
    results: dict[int, GenerationResult] = field(default_factory=dict)  # the choices done
    last_check: float = field(default_factory=time.monotonic)  # the last disconnection poll

    def __post_init__(self):
        self.completion_id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    @property
    def finished(self) -> bool:
        """Every choice has its answer."""
        return len(self.results) == self.job.n


# No docstrings: FastAPI would put them in the OpenAPI document.
async def chat_completions(request: Request):
    return await answer_request(request, ChatCompletionRequest)


async def completions(request: Request):
    return await answer_request(request, CompletionRequest)


async def answer_request(request: Request, schema: type[GenerationRequest]):
    """One request of either endpoint, from its first byte to its answer (module docstring)."""
    engine: Engine = request.app.state.engine
    settings: ServeSettings = request.app.state.settings
    deadline = time.monotonic() + settings.timeout_s  # body, preprocessing, queue and answer
    req = await read_request(request, settings, deadline, schema)
    try:
        prepared = await prepare(request.app.state.preprocessing, req, engine.target, settings, deadline)
    except MediaError as error:
        raise ApiError(error.status, str(error), param="messages") from error
    except SparrowError as error:
        raise ApiError(400, str(error)) from error
    flight = submit(engine, prepared, request, settings, deadline=deadline,
                    chat=schema is ChatCompletionRequest)
    try:
        # A stream starts at the first event; a single answer waits for its last choice.
        event = await next_event(flight)
        while not req.stream and event[0] in ("tokens", "done") and not flight.finished:
            event = await next_event(flight)
    except ClientGone:
        return Response(status_code=499)
    if event[0] not in ("tokens", "done"):
        raise terminal_error(event, settings.timeout_s)
    tokenizer = engine.target.tokenizer
    if not req.stream:
        return complete_json(flight, tokenizer)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(stream_events(flight, event, tokenizer, include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def read_request(request: Request, settings: ServeSettings, deadline: float,
                       schema: type[GenerationRequest]) -> GenerationRequest:
    """The body, read by hand rather than declared to FastAPI: the size limit and the deadline
    hold while it arrives, and each fault (too large, too slow, not JSON, too deep, not UTF-8,
    a field this server does not support, invalid, unknown model) is answered in OpenAI's
    shape."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            body = await _read_body(request, settings.max_upload_bytes)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {settings.timeout_s:g} s "
                            "(sparrow serve --timeout)", code="timeout") from None
    try:
        data = json.loads(body)
    except RecursionError:
        raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:
        raise ApiError(400, f"request body is not valid JSON ({error})") from error
    check_json(data)
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(schema.model_fields) - IGNORED_FIELDS)
        if unknown:
            raise ApiError(400, f"{unknown[0]} is not supported by this server (it would change "
                                "the answer or is not an OpenAI chat field)", param=unknown[0])
        data = {name: value for name, value in data.items() if name not in IGNORED_FIELDS}
    try:
        req = schema.model_validate(data, strict=True)
    except ValidationError as error:
        raise ApiError(400, validation_message(error.errors())) from error
    if req.model != settings.model_id:
        raise ApiError(404, f"model {req.model!r} is not served here; use {settings.model_id!r}",
                       code="model_not_found", param="model")
    return req


def check_json(value) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings that are not Unicode text (a lone
    surrogate, legal as a JSON escape, cannot be encoded), anywhere in the body."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "request body holds a string that is not valid Unicode (a lone "
                                    "surrogate escape such as \\ud800)") from None


async def _read_body(request: Request, limit: int) -> bytes:
    # Checked as it arrives too: a client may send no (or a false) Content-Length.
    length = request.headers.get("content-length", "")
    too_large = ApiError(413, f"request body over this server's limit of {limit} bytes "
                              "(sparrow serve --max-upload-mb)", code="request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise too_large
        chunks.append(piece)
    return b"".join(chunks)


async def prepare(slots: asyncio.Semaphore, req: ChatCompletionRequest, target,
                  settings: ServeSettings, deadline: float) -> Prepared:
    """`prepare_request` on a worker thread, at most `slots` at once (decoding a video takes
    memory), within the request's deadline (waiting for a slot included). A thread cannot be
    stopped: one past the deadline holds its slot until it ends, so the bound holds."""
    try:
        await asyncio.wait_for(slots.acquire(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise timed_out(settings.timeout_s) from None
    future = asyncio.get_running_loop().run_in_executor(None, prepare_request, req, target, settings)

    def finished(done: asyncio.Future) -> None:
        slots.release()
        if not done.cancelled():
            done.exception()  # retrieved: a request past its deadline no longer awaits it

    future.add_done_callback(finished)
    try:
        return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise timed_out(settings.timeout_s) from None


def submit(engine: Engine, prepared: Prepared, client: Request, settings: ServeSettings,
           deadline: float, chat: bool = True) -> InFlight:
    """Queue the generation (429 when the queue is full)."""
    events: asyncio.Queue = asyncio.Queue()
    job = GenerationJob(
        input_ids=prepared.input_ids, video=prepared.video, video_key=prepared.video_key,
        max_new_tokens=prepared.max_new_tokens, sampling=prepared.sampling,
        stops=prepared.stops, stop_token_ids=prepared.stop_token_ids, deadline=deadline,
        n=prepared.n, logprobs=prepared.logprobs,
        sink=partial(post_event, asyncio.get_running_loop(), events),
    )
    try:
        engine.submit(job)
    except QueueFull:
        raise ApiError(429, "the server's request queue is full; retry later", code="queue_full",
                       headers={"Retry-After": str(engine.retry_after_s())}) from None
    return InFlight(job, events, client, settings.model_id, settings.timeout_s, chat)


def post_event(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, kind: str, payload) -> None:
    """The job's sink, called on the engine thread: asyncio queues are not thread-safe, so
    the event is put on the queue by the event loop's own thread."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
    except RuntimeError:  # the event loop is gone: the server is shutting down
        pass


async def next_event(flight: InFlight) -> tuple[str, object]:
    """The engine's next event; raises the 504 ApiError past the deadline and ClientGone once
    the client has disconnected, after cancelling the job either way."""
    deadline = flight.job.deadline
    while True:
        now = time.monotonic()
        if now >= deadline:
            flight.job.cancel.set()
            raise timed_out(flight.timeout_s)
        if now - flight.last_check >= POLL_S:  # between events too: tokens may never pause
            flight.last_check = now
            if await flight.client.is_disconnected():
                flight.job.cancel.set()
                raise ClientGone
        try:
            event = await asyncio.wait_for(flight.events.get(), min(POLL_S, deadline - now))
        except TimeoutError:
            continue
        if event[0] == "done":
            index, result = event[1]
            flight.results[index] = result
        return event


def terminal_error(event: tuple[str, object], timeout_s: float) -> ApiError:
    """The error for an engine event that ends a job without an answer."""
    kind, payload = event
    if kind == "timeout":
        return timed_out(timeout_s)
    if kind == "cancelled":
        return ApiError(503, "the request was cancelled (server shutting down)")
    if isinstance(payload, ApiError):
        return payload
    if isinstance(payload, SparrowError):
        return ApiError(400, str(payload))
    return ApiError(500, f"generation failed: {type(payload).__name__}")


def complete_json(flight: InFlight, tokenizer) -> dict:
    """The chat.completion (or text_completion) object, with OpenAI's usage and sparrow's own
    fields: `sparrow` describes choice 0's generation, and with n > 1 each choice carries its
    own `sparrow` too."""
    results = [flight.results[index] for index in range(flight.job.n)]
    choices = []
    for index, result in enumerate(results):
        detokenizer = Detokenizer(tokenizer, flight.job.stops, flight.job.stop_token_ids)
        text = detokenizer.add(result.token_ids) + detokenizer.finish()
        logprobs = _logprobs(flight, tokenizer, result.logprobs)
        choice = ({"index": index, "message": {"role": "assistant", "content": text}} if flight.chat
                  else {"index": index, "text": text})
        choice.update(finish_reason=FINISH_REASONS.get(result.finish_reason, "stop"), logprobs=logprobs)
        if len(results) > 1:
            choice["sparrow"] = _sparrow_info(result)
        choices.append(choice)
    return {
        "id": flight.completion_id, "object": "chat.completion" if flight.chat else "text_completion",
        "created": int(time.time()), "model": flight.model, "choices": choices,
        "usage": _usage(results), "sparrow": _sparrow_info(results[0]),
    }


def _logprobs(flight: InFlight, tokenizer, logprobs, offset: int = 0) -> dict | None:
    """A choice's (or a chunk's) logprobs in the endpoint's shape; None when not asked for."""
    if logprobs is None:
        return None
    if flight.chat:
        return chat_logprobs(tokenizer, logprobs)
    return completion_logprobs(tokenizer, logprobs, offset)


async def stream_events(flight: InFlight, first: tuple[str, object], tokenizer,
                        include_usage: bool) -> AsyncIterator[str]:
    """The SSE body, starting from the engine's first event: for each choice (chat) a role
    chunk, a chunk per new piece of text (with its tokens' logprobs, if asked for), a last
    chunk with the finish reason and sparrow's fields; then the usage chunk if asked for, then
    `data: [DONE]`. Choices come one after the other, told apart by `index`. A failure after
    the 200 went out (a timeout, a failed generation) is sent as one error event, without
    [DONE]: the partial answer is not completed."""
    detokenizers = [Detokenizer(tokenizer, flight.job.stops, flight.job.stop_token_ids)
                    for _ in range(flight.job.n)]
    offsets = [0] * flight.job.n  # /v1/completions' text_offset so far, per choice
    started: set[int] = set()
    event = first
    try:
        while True:
            kind, payload = event
            index = payload.index if kind == "tokens" else payload[0] if kind == "done" else 0
            if kind in ("tokens", "done") and flight.chat and index not in started:
                started.add(index)
                yield chunk(flight, [_choice(flight, index, {"role": "assistant", "content": ""})])
            if kind == "tokens":
                text, logprobs = _stream_piece(detokenizers[index], payload)
                logprobs = _logprobs(flight, tokenizer, logprobs, offsets[index])
                if text or logprobs:
                    yield chunk(flight, [_choice(flight, index, text, logprobs=logprobs)])
                if logprobs and not flight.chat:
                    offsets[index] += sum(map(len, logprobs["tokens"]))
            elif kind == "done":
                result = payload[1]
                if text := detokenizers[index].finish():
                    yield chunk(flight, [_choice(flight, index, text)])
                finish = FINISH_REASONS.get(result.finish_reason, "stop")
                yield chunk(flight, [_choice(flight, index, None, finish)], sparrow=_sparrow_info(result))
                if flight.finished:
                    if include_usage:
                        yield chunk(flight, [], usage=_usage(
                            [flight.results[i] for i in range(flight.job.n)]))
                    yield "data: [DONE]\n\n"
                    return
            else:
                yield _sse(terminal_error(event, flight.timeout_s).body())
                return
            try:
                event = await next_event(flight)
            except ApiError as error:  # the timeout
                yield _sse(error.body())
                return
    except ClientGone:
        return
    finally:
        flight.job.cancel.set()  # the client left (or all is done): stop generating for it


def _stream_piece(detokenizer: Detokenizer, piece: Piece) -> tuple[str, list | None]:
    """A piece's new text and the logprobs of its tokens that belong to the answer (none
    after a stop; the one that completed it included, as in the answer's token_ids)."""
    if detokenizer.stopped_at is not None:
        return "", None
    before = len(detokenizer.token_ids)
    text = detokenizer.add(piece.tokens)
    if piece.logprobs is None:
        return text, None
    kept = len(piece.tokens) if detokenizer.stopped_at is None else detokenizer.stopped_at - before
    return text, piece.logprobs[:kept] or None


def chunk(flight: InFlight, choices: list[dict], **extra) -> str:
    """One chat.completion.chunk (or text_completion) event; `choices` is empty only in the
    usage chunk."""
    return _sse({"id": flight.completion_id,
                 "object": "chat.completion.chunk" if flight.chat else "text_completion",
                 "created": int(time.time()), "model": flight.model, "choices": choices, **extra})


def _choice(flight: InFlight, index: int, piece: str | dict | None, finish: str | None = None,
            logprobs: dict | None = None) -> dict:
    """A streamed choice: `piece` is new text (None: none), or for chat the whole delta."""
    if not flight.chat:
        return {"index": index, "text": piece or "", "finish_reason": finish, "logprobs": logprobs}
    delta = piece if isinstance(piece, dict) else ({} if piece is None else {"content": piece})
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _usage(results: list[GenerationResult]) -> dict:
    """The prompt once (the choices share it), the tokens of every choice."""
    prompt, completion = results[0].num_prompt_tokens, sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sparrow_info(result: GenerationResult) -> dict:
    return {"method": result.method, "tau": result.tau, "target_calls": result.target_calls,
            "accepted_lengths": result.accepted_lengths,
            "num_visual_tokens": result.num_visual_tokens, "token_ids": result.token_ids,
            "finish_reason": result.finish_reason, "timings": asdict(result.timings)}
