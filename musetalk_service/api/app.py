"""The FastAPI application, and the uvicorn server whose SIGTERM drains the job queue, serving HTTP meanwhile.

`create_app` builds the `Service` (api/service.py) the routes share: the job queue in front of the
GPU, metrics, the path policy. The models load in the background unless a loaded pipeline is
given, so `/health` answers at once and `/ready` turns 200 when they are loaded and warmed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import fastapi_offline
import uvicorn
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles

import musetalk_service
from musetalk_service.api.errors import install_error_handlers
from musetalk_service.api.middleware import ApiKeyMiddleware, DrainMiddleware, MetricsMiddleware
from musetalk_service.api.requests import check_limits
from musetalk_service.api.routes import ROUTERS
from musetalk_service.api.routes.common import body_schema
from musetalk_service.api.schemas import AvatarBody, LipsyncBody
from musetalk_service.api.service import Service
from musetalk_service.settings import Settings


def create_app(
    settings: Settings,
    pipeline: Any = None,
    *,
    ready_timeout_s: float = 5.0,
    on_load_failure: Callable[[str], None] | None = None,
    concurrency: int = 1,
) -> FastAPI:
    """The service. It loads the pipeline in the background unless one is given (tests share a
    loaded one). `ready_timeout_s`: how long `/ready` waits for the GPU to answer a tiny op.
    `on_load_failure(message)` is called (from the loading thread) if the models fail to load.
    `concurrency`: jobs run at once (Ray Serve: one per engine replica; `pipeline` is then the
    deployment's `serve_ray.remote.RemoteEngine`).
    Raises ValueError when a configured input or output root is not an existing folder."""
    service = Service(settings, pipeline, ready_timeout_s=ready_timeout_s, on_load_failure=on_load_failure, concurrency=concurrency)
    service.check_limits = lambda request, avatar: check_limits(request, settings, avatar)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            # In a thread: it waits for the running job (up to jobs.shutdown_timeout_s).
            await anyio.to_thread.run_sync(service.stop)

    app = FastAPI(
        title="musetalk-service",
        version=musetalk_service.__version__,
        summary="MuseTalk 1.5 lip-sync: a talking-head video and a speech track in, a lip-synced MP4 out.",
        lifespan=lifespan,
        docs_url=None,  # served by `_serve_docs` from installed assets, not FastAPI's CDN page
        redoc_url=None,
    )
    app.state.service = service
    app.state.settings = settings
    api_routes = [route for router in ROUTERS for route in router.routes]
    install_error_handlers(app, api_routes)
    # Inside the API key check (an unauthorized POST is 401 even while draining).
    app.add_middleware(DrainMiddleware, draining=lambda: service.stopping)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key, open_paths=OPEN_PATHS)
    # Outermost: it also counts the 401s and the 500s answered by the middleware inside it.
    app.add_middleware(MetricsMiddleware, metrics=lambda: service.metrics, routes=lambda: [*api_routes, *app.router.routes])
    for router in ROUTERS:
        app.include_router(router)
    _document(app, open_paths=OPEN_PATHS if settings.api_key else None)
    _serve_docs(app)
    return app


OPEN_PATHS = ("/health",)
"""The routes that need no API key, even when one is set."""


def _document(app: FastAPI, open_paths: tuple[str, ...] | None) -> None:
    """What FastAPI can't see in the OpenAPI document: the routes read their bodies themselves
    (JSON or multipart): add the body schemas their `requestBody` refers to; and the API key the
    middleware checks (`open_paths` None: no key is configured) as the `X-API-Key` scheme. And
    what it gets wrong: a bad path or query parameter is answered 400 `invalid_option`
    (api/errors.py), never FastAPI's 422 `HTTPValidationError` it would document."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            components = schema.setdefault("components", {})
            for model in (LipsyncBody, AvatarBody):
                body = body_schema(model)
                components.setdefault("schemas", {}).update(body.pop("$defs", {}))
                components["schemas"][model.__name__] = body
            for operations in schema["paths"].values():
                for operation in operations.values():
                    if _schema_ref(operation["responses"].get("422", {})) == _VALIDATION_ERROR:
                        del operation["responses"]["422"]
            for unused in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(unused, None)
            if open_paths is not None:
                components["securitySchemes"] = {"ApiKey": _API_KEY.model.model_dump(mode="json", by_alias=True, exclude_none=True)}
                for path, operations in schema["paths"].items():
                    if path not in open_paths:
                        for operation in operations.values():
                            operation["security"] = [{"ApiKey": []}]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


_VALIDATION_ERROR = "#/components/schemas/HTTPValidationError"

DOCS_ASSETS = "/docs/assets"
_SWAGGER_UI = Path(fastapi_offline.__file__).parent / "static"
"""Swagger UI's script, CSS and icon as the fastapi-offline wheel ships them (Swagger UI 5, which
reads OpenAPI 3.1), so /docs works on a host with no internet (FastAPI's page loads a CDN)."""


def _serve_docs(app: FastAPI) -> None:
    """/docs: Swagger UI on the app's OpenAPI document, every asset served by the app itself. With
    an API key set, the page and its assets need the key like every route but /health."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=_SWAGGER_UI), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )


def _schema_ref(response: dict[str, Any]) -> str | None:
    return response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")


_API_KEY = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The configured `api_key` (unset: no key is needed); 401 `unauthorized` otherwise."
)
"""Documentation only: `ApiKeyMiddleware` checks the key, with the service's own error body."""


class ServiceServer(uvicorn.Server):
    """uvicorn's server, whose SIGTERM/SIGINT drains the service before it stops listening.

    uvicorn's own handler stops listening at once (and re-raises the signal at exit). Here the
    first signal starts the service's drain (`Service.begin_shutdown` with `jobs.shutdown_mode`)
    and a later one cancels the running job; HTTP is served all along, and the server exits,
    with status 0, once `Service.drained()` says no job runs. The job manager's lock is never
    taken in the signal handler: the call is scheduled on the event loop.
    """

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.service: Service = config.app.state.service
        self.exit_signals = 0

    def handle_exit(self, sig: int, frame: Any) -> None:
        service = self.service
        self.exit_signals += 1
        mode = "cancel" if self.exit_signals > 1 else service.settings.jobs.shutdown_mode
        loop = service.loop
        if loop is None or loop.is_closed():
            self.should_exit = True  # not started yet (or gone): nothing to drain
            return
        loop.call_soon_threadsafe(service.begin_shutdown, mode)

    async def on_tick(self, counter: int) -> bool:
        if self.service.drained():
            self.should_exit = True
        return await super().on_tick(counter)
