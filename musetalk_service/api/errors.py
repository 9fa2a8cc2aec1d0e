"""Every failure leaves the API as `{error: {code, message}}` with the right status.

Input problems say what to change; a `ServiceError` answers with its own code, status and message.
Anything else is a fault nobody foresaw: it is logged with its traceback and answered with a
generic message, so no path, stack or secret leaks to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from musetalk_service.api.jobs import QueueFull
from musetalk_service.errors import InputError, ServiceError

log = logging.getLogger(__name__)


class NotReady(ServiceError):
    """The models are loading, failed to load, or the GPU does not answer: try another instance."""

    code = "not_ready"
    status = 503


class Unauthorized(ServiceError):
    code = "unauthorized"
    status = 401


class DiskFull(ServiceError):
    """The output or work disk has no space left: the job failed and removed what it had written."""

    code = "disk_full"
    status = 507


class LimitExceeded(InputError):
    """The input is beyond a configured limit (`limits.*`); the code says which."""

    status = 422


class UploadTooLarge(InputError):
    code = "upload_too_large"
    status = 413


class BadUpload(InputError):
    code = "invalid_upload"
    status = 400


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}}, headers=headers)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    if exc.status == 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.code, exc_info=exc)
    elif exc.status > 500:
        log.warning("%s %s failed: %s: %s", request.method, request.url.path, exc.code, exc.message)
    else:
        log.info("%s %s rejected: %s: %s", request.method, request.url.path, exc.code, exc.message)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None
    return error_response(exc.status, exc.code, exc.message, headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # A body that is not JSON, or not a JSON object, has no fields to blame.
    invalid_json = next((e for e in errors if e["type"] == "json_invalid"), None)
    if invalid_json is not None:
        return error_response(400, "invalid_request", f"the body is not valid JSON: {invalid_json['ctx']['error']}")
    if any(tuple(e["loc"]) == ("body",) for e in errors):
        return error_response(400, "invalid_request", "the body must be a JSON object (Content-Type: application/json)")
    return error_response(400, "invalid_option", describe_validation_errors(errors))


def _http_error_handler(routes: Sequence[BaseRoute]) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """Unknown route, wrong method...: the same error shape as everything else, the headers kept.
    Starlette's 405 names only the first route matching the path in `Allow`; a path served by
    several routes (GET and DELETE /jobs/{id}) allows the methods of all of `routes` matching it."""

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        phrase = HTTPStatus(exc.status_code).phrase
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            methods = {m for route in routes if route.matches(request.scope)[0] != Match.NONE for m in getattr(route, "methods", None) or ()}
            headers["Allow"] = ", ".join(sorted(methods))
        return error_response(exc.status_code, phrase.lower().replace(" ", "_"), str(exc.detail), headers or None)

    return http_error


class CatchUnexpected:
    """ASGI middleware: any other exception becomes a 500 `internal_error`, logged with its traceback.

    Not an `Exception` handler: Starlette re-raises after such a handler has answered, and uvicorn
    then closes the connection, which can reset it before the client has read the 500.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            log.exception("%s %s failed unexpectedly", scope["method"], scope["path"])
            if started:
                raise  # too late for a clean answer; the server ends the connection
            response = error_response(500, "internal_error", "internal server error; the server log has the details")
            await response(scope, receive, send)


def describe_validation_errors(errors: Sequence[dict]) -> str:
    """`batch_size: Input should be greater than or equal to 1; parsing_mode: ...` (the values are not echoed)."""
    return "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors)


def _field(loc: tuple) -> str:
    """`("body", "face_box", 0)` -> `face_box[0]`; `("query", "limit")` -> `limit`."""
    parts = [str(p) for p in loc if p not in ("body", "query")]
    name = parts[0] if parts else "body"
    return name + "".join(f"[{p}]" for p in parts[1:])


def install_error_handlers(app: FastAPI, routes: Sequence[BaseRoute]) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error_handler(routes))
    app.add_middleware(CatchUnexpected)
