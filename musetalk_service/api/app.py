"""The FastAPI application: the resident pipeline, one request on the models at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

import musetalk_service
from musetalk_service.api.errors import install_error_handlers
from musetalk_service.api.routes import router
from musetalk_service.pipeline.request import LipsyncRequest
from musetalk_service.pipeline.result import LipsyncResult
from musetalk_service.pipeline.runner import LipsyncPipeline
from musetalk_service.settings import Settings


class PipelineSlot:
    """The one slot on the models: requests take it in arrival order and run in a worker thread."""

    def __init__(self, pipeline: LipsyncPipeline):
        self.pipeline = pipeline
        self._lock = asyncio.Lock()

    async def run(self, request: LipsyncRequest) -> LipsyncResult:
        async with self._lock:
            # The thread is never abandoned (anyio's default): if the client goes away, the lock is
            # released only once the run has finished with the models, so the next run can't overlap it.
            return await anyio.to_thread.run_sync(self.pipeline.run, request)


def create_app(settings: Settings, pipeline: LipsyncPipeline | None = None) -> FastAPI:
    """The service; it loads the pipeline at start unless one is given (tests share a loaded one)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = pipeline
        if loaded is None:
            # In a thread: loading takes seconds to minutes and must not stall the event loop.
            loaded = await anyio.to_thread.run_sync(LipsyncPipeline.load, settings)
        app.state.slot = PipelineSlot(loaded)
        yield

    app = FastAPI(
        title="musetalk-service",
        version=musetalk_service.__version__,
        summary="MuseTalk 1.5 lip-sync: a talking-head video and a speech track in, a lip-synced MP4 out.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    return app
