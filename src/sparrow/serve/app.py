"""The FastAPI application: OpenAI's chat completions API over one sparrow engine.

    POST /v1/chat/completions   chat completion, streaming (SSE) or not (completions.py)
    POST /v1/completions        a plain prompt continued, streaming or not (completions.py)
    GET  /v1/models             the one served model
    GET  /metrics               Prometheus counters (metrics.py)
    GET  /health                liveness; with the API key (or when none is set) also the
                                queue, counters and prefix cache
    GET  /openapi.json, /docs   the API document

Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}}
(errors.py), and leaves the server serving. Output equals `sparrow.api.answer` (and so
`sparrow generate`) for the same video, question and settings: the same frame sampling, prompt
ids, and decoding (prepare.py). The handlers are module-level functions that find the engine
and the settings on `request.app.state`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparrow import __version__
from sparrow.options import DEFAULT_NUM_FRAMES
from sparrow.serve import errors
from sparrow.serve.completions import RESPONSES, chat_completions, completions
from sparrow.serve.engine import Engine
from sparrow.serve.metrics import StatusCounter, exposition
from sparrow.serve.schemas import ChatCompletionRequest, CompletionRequest


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
    max_preprocess: int = 2  # requests decoding their video at once (the rest wait, in the timeout)
    max_video_pixels: int = 4096 * 2160  # a frame's width x height, read before decoding
    allowed_origins: list[str] = field(default_factory=list)  # CORS: browser origins allowed


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The application; its lifespan starts and stops the engine's worker thread."""
    app = FastAPI(title="sparrow", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible video chat with lossless speculative decoding.")
    app.state.engine, app.state.settings = engine, settings
    app.state.created = int(time.time())
    app.state.preprocessing = asyncio.Semaphore(settings.max_preprocess)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:  # added last, so outermost: a preflight never meets the key check
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type",
                                                                         REQUEST_ID.decode()],
                           expose_headers=[REQUEST_ID.decode(), "Retry-After"])
    app.state.statuses = Counter()
    app.add_middleware(StatusCounter, statuses=app.state.statuses)
    app.add_middleware(RequestIdMiddleware)
    app.add_exception_handler(errors.ApiError, errors.api_error_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(Exception, errors.server_error_handler)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], responses=RESPONSES)
    app.add_api_route("/v1/completions", completions, methods=["POST"], responses=RESPONSES)
    app.openapi = partial(_openapi, app, settings.model_id)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.engine.start()
    yield
    app.state.engine.stop()


async def health(request: Request) -> dict:
    settings: ServeSettings = request.app.state.settings
    if settings.api_key and not ApiKeyMiddleware.authorized(request.scope, settings.api_key):
        return {"status": "ok"}  # liveness only: nothing about the server to a stranger
    engine: Engine = request.app.state.engine
    cache = engine.prefix_cache
    prefix_cache = None if cache is None else {
        "entries": len(cache), "bytes": cache.nbytes, "max_bytes": cache.max_bytes,
        **asdict(cache.stats)}
    return {"status": "ok", "model": request.app.state.settings.model_id, "method": engine.method,
            "queued": engine.queued, "busy": engine.busy, "stats": asdict(engine.stats),
            "prefix_cache": prefix_cache}


async def metrics(request: Request) -> Response:
    body, content_type = exposition(request.app.state.engine, request.app.state.statuses)
    return Response(body, media_type=content_type)


async def models(request: Request) -> dict:
    return {"object": "list", "data": [
        {"id": request.app.state.settings.model_id, "object": "model",
         "created": request.app.state.created, "owned_by": "sparrow"}
    ]}


def _openapi(app: FastAPI, model_id: str) -> dict:
    """FastAPI's document, with the request bodies (parsed by hand, for OpenAI-shaped errors)
    described by their pydantic models; `model` lists the one served model."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in (("/v1/chat/completions", ChatCompletionRequest),
                        ("/v1/completions", CompletionRequest)):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        body["properties"]["model"]["enum"] = [model_id]
        components[model.__name__] = body
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    app.openapi_schema = schema
    return schema


class ApiKeyMiddleware:
    """Every path but /health needs `Authorization: Bearer KEY` (compared in constant time);
    /health answers more with it (`health`)."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    @staticmethod
    def authorized(scope, api_key: str) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {api_key}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            if not self.authorized(scope, self.api_key):
                response = errors.ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                           code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


REQUEST_ID = b"x-request-id"


class RequestIdMiddleware:
    """Every response carries `X-Request-Id`: the client's own (if it is a short printable
    token) or a new one, so a client can match its request to the server's answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID, b"")
        ok = 0 < len(given) <= 128 and all(33 <= c < 127 for c in given)
        request_id = given if ok else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID, request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)
