"""Errors in OpenAI's shape: every failure answers {"error": {"message", "type", "param",
"code"}} with its HTTP status, whatever raised it (our own checks, FastAPI's routing and
validation, or a bug), and the server keeps serving."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def timed_out(timeout_s: float) -> ApiError:
    """The 504 of a request that passed its deadline (in the queue or while generating)."""
    return ApiError(504, f"request timed out after {timeout_s:g} s", code="timeout")


def validation_message(errors: list) -> str:
    """Pydantic's errors as one line: the first one, and how many more there are."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid request: {where}: {first.get('msg', 'invalid')}{more}"


# The application's exception handlers (registered by `create_app`), one per kind of failure.

async def api_error_handler(request: Request, error: ApiError) -> JSONResponse:
    return error.response()


async def http_error_handler(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # Starlette's own: unknown route (404), wrong method (405).
    return ApiError(error.status_code, str(error.detail)).response()


async def validation_error_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    return ApiError(400, validation_message(error.errors())).response()


async def server_error_handler(request: Request, error: Exception) -> JSONResponse:
    # Only the exception's type: its message may hold server-side paths or data.
    return ApiError(500, f"internal error: {type(error).__name__}").response()
