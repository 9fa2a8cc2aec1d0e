"""Every failure leaves the API as `{error: {code, message}}` with the right status.

Input problems say what to change. Faults of the server are logged with their traceback and
answered with a generic message, so no path, stderr or secret leaks to the client.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from musetalk_service.errors import ServiceError

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    if exc.status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.code, exc_info=exc)
    else:
        log.info("%s %s rejected: %s: %s", request.method, request.url.path, exc.code, exc.message)
    return error_response(exc.status, exc.code, exc.message)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # A body that is not JSON, or not a JSON object, has no fields to blame.
    if any(e["type"] == "json_invalid" for e in errors):
        detail = next(e for e in errors if e["type"] == "json_invalid")
        return error_response(400, "invalid_request", f"the body is not valid JSON: {detail['ctx']['error']}")
    if any(tuple(e["loc"]) == ("body",) for e in errors):
        return error_response(400, "invalid_request", "the body must be a JSON object (Content-Type: application/json)")
    problems = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors)
    return error_response(400, "invalid_option", problems)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # Unknown route, wrong method...: the same error shape as everything else.
    phrase = HTTPStatus(exc.status_code).phrase
    return error_response(exc.status_code, phrase.lower().replace(" ", "_"), str(exc.detail))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed unexpectedly", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error; the server log has the details")


def _field(loc: tuple) -> str:
    """`("body", "face_box", 0)` -> `face_box[0]`."""
    parts = [str(p) for p in loc if p != "body"]
    name = parts[0] if parts else "body"
    return name + "".join(f"[{p}]" for p in parts[1:])


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
