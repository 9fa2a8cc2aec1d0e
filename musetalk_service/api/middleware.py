"""ASGI middleware: the API key check, the refusal of new work while draining, the per-request metrics.

All are plain ASGI (not Starlette's `BaseHTTPMiddleware`): they pass `receive` through untouched,
so a handler can still learn that its client went away, and they add no task per request.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from musetalk_service.api.errors import error_response
from musetalk_service.api.jobs import NO_NEW_JOBS, ShuttingDown
from musetalk_service.api.metrics import ServiceMetrics

API_KEY_HEADER = "x-api-key"
_PEEK_BYTES = 4096
"""Error bodies are small JSON objects; the outcome is read from their first bytes."""


class ApiKeyMiddleware:
    """Every request but those to `open_paths` needs header `X-API-Key: <key>` (401 otherwise).

    Compared in constant time. The key is never logged or echoed.
    """

    def __init__(self, app: ASGIApp, key: str, open_paths: Collection[str] = ("/health",)):
        self.app = app
        self._key = key.encode()
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == API_KEY_HEADER.encode()), None)
        if given is None or not hmac.compare_digest(given, self._key):
            reason = "missing" if given is None else "wrong"
            response = error_response(401, "unauthorized", f"{reason} API key: send it in header X-API-Key")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class DrainMiddleware:
    """While the service drains (`draining()` true), every POST is 503 `shutting_down` at once.

    Answered before the body is read, with `Connection: close`: the server then closes the
    connection instead of reading the rest of the body to keep it alive, so a large upload is
    never received. Every other method (probes, job status, output downloads, cancels) passes.
    """

    def __init__(self, app: ASGIApp, draining: Callable[[], bool]):
        self.app = app
        self._draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self._draining():
            response = error_response(ShuttingDown.status, ShuttingDown.code, NO_NEW_JOBS, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class MetricsMiddleware:
    """Counts every HTTP request by route template and outcome (`ok`, or the error's code).

    The route is the template the router matched (`/jobs/{job_id}`), found again here for requests
    answered before routing (401); anything else is `unmatched`, so the label set stays bounded.
    `routes()` gives the candidates (objects with `path` and `path_regex`).
    """

    def __init__(self, app: ASGIApp, metrics: Callable[[], ServiceMetrics | None], routes: Callable[[], list]):
        self.app = app
        self._metrics = metrics
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        peek = bytearray()

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and len(peek) < _PEEK_BYTES:
                peek.extend(message.get("body", b"")[: _PEEK_BYTES - len(peek)])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            metrics = self._metrics()
            if metrics is not None:
                metrics.observe_request(self._route(scope), _outcome(status, bytes(peek)))

    def _route(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        # Answered before routing (401): match the path against the route templates, any method.
        for candidate in self._routes():
            regex = getattr(candidate, "path_regex", None)
            if regex is not None and regex.match(scope["path"]):
                return candidate.path
        return "unmatched"


def _outcome(status: int, body: bytes) -> str:
    if status < 400:
        return "ok"
    try:
        code = json.loads(body)["error"]["code"]
        if isinstance(code, str) and code.isidentifier():
            return code
    except (ValueError, KeyError, TypeError):
        pass
    return f"http_{status}"
