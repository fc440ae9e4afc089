"""The FastAPI application: OpenAI's chat completions API over one sparrow engine.

    POST /v1/chat/completions   chat completion, streaming (SSE) or not
    GET  /v1/models             the one served model
    GET  /health                liveness + queue state (never needs the API key)
    GET  /openapi.json, /docs   the API document

Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
and leaves the server serving. Output equals `sparrow.api.answer` (and so `sparrow generate`)
for the same video, question and settings: the same frame sampling, prompt ids, and decoding.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparrow.errors import SparrowError
from sparrow.options import DEFAULT_NUM_FRAMES
from sparrow.serve.engine import Engine, GenerationJob, QueueFull
from sparrow.serve.media import MediaError, video_file
from sparrow.serve.prompt import Detokenizer
from sparrow.serve.schemas import ChatCompletionRequest
from sparrow.speculative.generate import GenerationResult
from sparrow.speculative.sampling import SamplingParams
from sparrow.video.io import read_video
from sparrow.video.processing import count_visual_tokens, preprocess_video
from sparrow.video.prompt import VIDEO_PART, render_chat

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
    429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error",
}
FINISH_REASONS = {"eos": "stop", "length": "length"}
POLL_S = 0.25  # how often a waiting request checks whether its client is still there


@dataclass
class ServeSettings:
    """Per-request limits and access rules (the `sparrow serve` flags)."""

    model_id: str
    media_roots: list[Path] = field(default_factory=list)  # local videos allowed only under these
    api_key: str | None = None
    num_frames: int = DEFAULT_NUM_FRAMES  # frames sampled when a request names neither num_frames nor fps
    max_frames: int = 64
    max_visual_tokens: int = 16384
    max_tokens: int = 1024  # the cap on max_tokens, and its default
    timeout_s: float = 300.0  # from arrival to the last token, queue wait included
    max_upload_bytes: int = 64 * 2**20  # request body size (a base64 video is 4/3 its file)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class _ClientGone(Exception):
    pass


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    input_ids: object  # (1, L) torch.long
    video: object  # VideoInputs | None
    video_key: str | None
    max_new_tokens: int
    sampling: SamplingParams


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The application; its lifespan starts and stops the engine's worker thread."""
    from contextlib import asynccontextmanager

    from sparrow import __version__

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="sparrow", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible video chat with lossless speculative decoding.")
    created = int(time.time())
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        return ApiError(error.status_code, str(error.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        return ApiError(400, _validation_message(error.errors())).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, error: Exception):
        return ApiError(500, f"internal error: {type(error).__name__}").response()

    @app.get("/health")
    async def health() -> dict:
        cache = engine.prefix_cache
        prefix_cache = None if cache is None else {
            "entries": len(cache), "bytes": cache.nbytes, "max_bytes": cache.max_bytes,
            **asdict(cache.stats)}
        return {"status": "ok", "model": settings.model_id, "method": engine.method,
                "queued": engine.queued, "busy": engine.busy, "stats": asdict(engine.stats),
                "prefix_cache": prefix_cache}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": settings.model_id, "object": "model", "created": created, "owned_by": "sparrow"}
        ]}

    @app.post("/v1/chat/completions", responses={
        200: {"description": "a chat.completion object, or an SSE stream of chat.completion.chunk"},
        400: {"description": "invalid request"}, 401: {"description": "missing or wrong API key"},
        403: {"description": "video path outside the media roots"},
        404: {"description": "unknown model"}, 413: {"description": "request body too large"},
        429: {"description": "queue full"}, 504: {"description": "request timed out"},
    })
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        body = await _read_body(request, settings.max_upload_bytes)
        try:
            data = json.loads(body)
        except ValueError as error:
            raise ApiError(400, f"request body is not valid JSON ({error})") from error
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as error:
            raise ApiError(400, _validation_message(error.errors())) from error
        if req.model != settings.model_id:
            raise ApiError(404, f"model {req.model!r} is not served here; use {settings.model_id!r}",
                           code="model_not_found", param="model")
        try:
            prepared = await run_in_threadpool(prepare_request, req, engine, settings)
        except MediaError as error:
            raise ApiError(error.status, str(error), param="messages") from error
        except SparrowError as error:
            raise ApiError(400, str(error)) from error
        return await _complete(request, req, prepared, arrived)

    async def _complete(request: Request, req: ChatCompletionRequest, prepared: Prepared,
                        arrived: float):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(kind: str, payload) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is gone: the server is shutting down
                pass

        deadline = arrived + settings.timeout_s
        job = GenerationJob(
            input_ids=prepared.input_ids, video=prepared.video, video_key=prepared.video_key,
            max_new_tokens=prepared.max_new_tokens, sampling=prepared.sampling,
            deadline=deadline, sink=sink,
        )
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(429, "the server's request queue is full; retry later",
                           code="queue_full") from None

        last_check = time.monotonic()

        async def next_event():
            nonlocal last_check
            while True:
                now = time.monotonic()
                if now >= deadline:
                    job.cancel.set()
                    raise ApiError(504, f"request timed out after {settings.timeout_s:g} s",
                                   code="timeout")
                if now - last_check >= POLL_S:  # between events too: tokens may never pause
                    last_check = now
                    if await request.is_disconnected():
                        job.cancel.set()
                        raise _ClientGone
                try:
                    return await asyncio.wait_for(events.get(), min(POLL_S, deadline - now))
                except TimeoutError:
                    continue

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        tokenizer = engine.target.tokenizer
        try:
            first = await next_event()
            while first[0] == "tokens" and not req.stream:  # non-streaming: wait for the end
                first = await next_event()
        except _ClientGone:
            return Response(status_code=499)
        except ApiError:
            job.cancel.set()
            raise
        if first[0] not in ("tokens", "done"):
            raise _terminal_error(first, settings)
        if not req.stream:
            result: GenerationResult = first[1]
            text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
            return {
                "id": completion_id, "object": "chat.completion", "created": int(time.time()),
                "model": settings.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": FINISH_REASONS.get(result.finish_reason, "stop"),
                             "logprobs": None}],
                "usage": _usage(result), "sparrow": _sparrow_info(result),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            data = {"id": completion_id, "object": "chat.completion.chunk",
                    "created": int(time.time()), "model": settings.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                 "logprobs": None}], **extra}
            return f"data: {json.dumps(data)}\n\n"

        async def stream():
            detokenizer = Detokenizer(tokenizer)
            event = first
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, payload = event
                    if kind == "tokens":
                        if text := detokenizer.add(payload):
                            yield chunk({"content": text})
                    elif kind == "done":
                        if text := detokenizer.finish():
                            yield chunk({"content": text})
                        finish = FINISH_REASONS.get(payload.finish_reason, "stop")
                        yield chunk({}, finish, sparrow=_sparrow_info(payload))
                        if include_usage:
                            usage = {"id": completion_id, "object": "chat.completion.chunk",
                                     "created": int(time.time()), "model": settings.model_id,
                                     "choices": [], "usage": _usage(payload)}
                            yield f"data: {json.dumps(usage)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        yield f"data: {json.dumps(_terminal_error(event, settings).body())}\n\n"
                        return
                    try:
                        event = await next_event()
                    except ApiError as error:  # timeout: the partial answer is not completed
                        yield f"data: {json.dumps(error.body())}\n\n"
                        return
            except _ClientGone:
                return
            finally:
                job.cancel.set()  # the client left (or all is done): stop generating for it

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    app.openapi = lambda: _openapi(app, settings.model_id)
    return app


def prepare_request(req: ChatCompletionRequest, engine: Engine, settings: ServeSettings) -> Prepared:
    """Validate the settings, read the video, build the prompt ids (runs on a worker thread:
    video decoding must not block the event loop)."""
    target = engine.target
    if req.n not in (None, 1):
        raise ApiError(400, "n must be 1", param="n")
    if req.stop:
        raise ApiError(400, "stop sequences are not supported", param="stop")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported (the answer is the target's own)", param=name)
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    if req.tools:
        raise ApiError(400, "tools are not supported", param="tools")
    max_new_tokens = req.max_completion_tokens or req.max_tokens or settings.max_tokens
    if max_new_tokens > settings.max_tokens:
        raise ApiError(400, f"max_tokens {max_new_tokens} is over this server's limit of "
                            f"{settings.max_tokens}", param="max_tokens")
    if req.num_frames is not None and req.fps is not None:
        raise ApiError(400, "give num_frames or fps, not both", param="num_frames")
    num_frames = req.num_frames if req.fps is None else None
    if num_frames is None and req.fps is None:
        num_frames = settings.num_frames
    if num_frames is not None and num_frames > settings.max_frames:
        raise ApiError(400, f"num_frames {num_frames} is over this server's limit of "
                            f"{settings.max_frames}", param="num_frames")

    messages, video_url = _template_messages(req)
    video, video_key = None, None
    if video_url is not None:
        with video_file(video_url, settings.media_roots, settings.max_upload_bytes) as (path, digest):
            # With fps, read one frame over the limit to tell "too many" from "just enough".
            try:
                clip = read_video(path, num_frames=num_frames, fps=req.fps,
                                  max_frames=None if req.fps is None else settings.max_frames + 1)
            except SparrowError as error:  # name the video as the client did, not our path
                label = "the uploaded video" if video_url.startswith("data:") else video_url
                raise ApiError(400, str(error).replace(str(path), label), param="messages") from error
            if clip.num_frames > settings.max_frames:
                raise ApiError(400, f"fps {req.fps:g} samples more than this server's limit of "
                                    f"{settings.max_frames} frames; lower fps", param="fps")
            height, width = clip.frames.shape[1:3]
            tokens = count_visual_tokens(target.config, target.processor_config, clip.num_frames,
                                         height, width)
            if tokens > settings.max_visual_tokens:
                raise ApiError(400, f"the video needs {tokens} visual tokens, over this server's "
                                    f"limit of {settings.max_visual_tokens}; ask for fewer frames",
                               param="num_frames")
            video = preprocess_video(clip, target.config, target.processor_config, dtype=target.dtype)
            video_key = f"{digest}:frames={num_frames}:fps={req.fps}"
    input_ids = render_chat(target.tokenizer, target.config, messages, video)
    context = getattr(target.config.get_text_config(), "max_position_embeddings", None)
    if context and input_ids.shape[1] + max_new_tokens > context:
        raise ApiError(400, f"the prompt ({input_ids.shape[1]} tokens) plus max_tokens "
                            f"({max_new_tokens}) exceeds the model's context of {context} tokens")
    sampling = SamplingParams(
        temperature=req.temperature if req.temperature is not None else 0.0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        top_k=req.top_k or 0,
        seed=req.seed,
    )
    return Prepared(input_ids, video, video_key, max_new_tokens, sampling)


def _template_messages(req: ChatCompletionRequest) -> tuple[list[dict], str | None]:
    """The messages in chat-template form, and the url of the (at most one) video part."""
    messages, video_url = [], None
    for index, message in enumerate(req.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content if message.content is not None else ""
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = []
            for part in content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    continue
                if role != "user":
                    raise ApiError(400, f"messages[{index}]: a video can only be in a user message",
                                   param="messages")
                if video_url is not None:
                    raise ApiError(400, "only one video per request is supported", param="messages")
                video_url = part.video_url.url
                parts.append(VIDEO_PART)
        if role == "user":
            messages.append({"role": role, "content": parts})
        else:
            messages.append({"role": role, "content": "".join(p["text"] for p in parts)})
    return messages, video_url


def _terminal_error(event: tuple, settings: ServeSettings) -> ApiError:
    kind, payload = event
    if kind == "timeout":
        return ApiError(504, f"request timed out after {settings.timeout_s:g} s", code="timeout")
    if kind == "cancelled":
        return ApiError(503, "the request was cancelled (server shutting down)")
    if isinstance(payload, ApiError):
        return payload
    if isinstance(payload, SparrowError):
        return ApiError(400, str(payload))
    return ApiError(500, f"generation failed: {type(payload).__name__}")


def _usage(result: GenerationResult) -> dict:
    completion = len(result.token_ids)
    return {"prompt_tokens": result.num_prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.num_prompt_tokens + completion}


def _sparrow_info(result: GenerationResult) -> dict:
    return {"method": result.method, "tau": result.tau, "target_calls": result.target_calls,
            "accepted_lengths": result.accepted_lengths,
            "num_visual_tokens": result.num_visual_tokens, "token_ids": result.token_ids,
            "finish_reason": result.finish_reason, "timings": asdict(result.timings)}


def _validation_message(errors: list) -> str:
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid request: {where}: {first.get('msg', 'invalid')}{more}"


async def _read_body(request: Request, limit: int) -> bytes:
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


def _openapi(app: FastAPI, model_id: str) -> dict:
    """FastAPI's document, with the chat request body (parsed by hand, for OpenAI-shaped
    errors) described by its pydantic model; `model` lists the one served model."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    body = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(body.pop("$defs", {}))
    body["properties"]["model"]["enum"] = [model_id]
    components["ChatCompletionRequest"] = body
    schema["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
    }
    app.openapi_schema = schema
    return schema


class ApiKeyMiddleware:
    """Every path but /health needs `Authorization: Bearer KEY` (compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                    code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
