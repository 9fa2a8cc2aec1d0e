"""The engine deployment: one replica per GPU, each holding the loaded models (`LipsyncPipeline`).

A job (`job`) is a streaming call: the engine runs in a thread of the replica while the call
yields `("replica", id)`, then `("progress", phase, done, total)` per batch, then one
`("result", value)` or `("error", exception)`. Errors travel as values, not as Ray's wrapped
exceptions, so the ingress raises the very `ServiceError` (code, status, fields) the engine raised.
When the ingress cancels the call (a job cancelled, or past its time limit) Ray cancels this
generator: the engine's cancel event is set and the call waits for the engine to stop at its next
batch, end its ffmpeg and remove its partial files before the replica takes another job.

Avatar affinity: a job on a prepared avatar is sent with the avatar id as Ray Serve's multiplexed
model id, so it goes to a replica that has that id loaded (`avatar`); a replica new to the id
loads the avatar from the cache folder, if it is shared (same host or shared file system),
instead of preparing it again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ray import serve

from musetalk_service.api.remote_media import UrlTask, fetch_and_run
from musetalk_service.api.requests import check_limits
from musetalk_service.errors import ServiceError
from musetalk_service.settings import Settings

log = logging.getLogger(__name__)

AVATARS_ROUTED_PER_REPLICA = 32
"""Avatar ids Ray Serve routes to one replica (its multiplexing LRU). The avatar cache's own memory
bound still decides what stays in memory; an id routed here but evicted is read back from disk."""

ENGINE_CALLS = 4
"""Calls one replica takes at once (Ray's `max_ongoing_requests`): one job, the rest lookups
(avatars, health) that must not wait minutes behind it. A second job routed here waits for the
first: the ingress runs one job per replica, so that happens only where affinity picks a busy
replica that holds the avatar over an idle one that would have to load it."""

REPLICA_WORK_PREFIX = "musetalk-replica-"


def replica_work_dir(work_dir: Path | None, replica_id: str) -> Path:
    """The work folder of one engine replica, under the configured work folder (or the temp dir)."""
    return Path(work_dir if work_dir is not None else tempfile.gettempdir()) / f"{REPLICA_WORK_PREFIX}{replica_id}"


Progress = Callable[[str, int, int], None]
JobEvent = tuple[Any, ...]


class EngineReplica:
    """The engine on this replica's device, its jobs streamed to the ingress (see the module doc)."""

    def __init__(self, settings: dict[str, Any]):
        from musetalk_service.pipeline.runner import LipsyncPipeline  # torch: only in engine replicas

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        given = Settings(**settings)
        # A folder of its own for the engine's temp files and fetched media: if the replica dies,
        # the ingress removes it (where the disk is shared) without knowing what was in it.
        self.work_root = replica_work_dir(given.work_dir, self.replica_id)
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.settings = given.model_copy(update={"work_dir": self.work_root})
        self.engine = LipsyncPipeline.load(self.settings)
        # The engine runs one job at a time (as in one process); lookups and the health check
        # run beside it (the deployment takes a few calls at once: `ENGINE_CALLS`).
        self._one_job = asyncio.Lock()
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=ENGINE_CALLS, thread_name_prefix="musetalk-engine")

    def __del__(self) -> None:
        # Ray Serve calls this when it stops the replica (the running job has finished or stopped).
        shutil.rmtree(self.work_root, ignore_errors=True)

    # -- jobs ----------------------------------------------------------------------------------------

    async def job(self, method: str, payload: Any) -> AsyncIterator[JobEvent]:
        """Run one job (`method`: run, prepare_avatar or run_url_task) and stream its events."""
        async with self._one_job:
            async for event in self._job(method, payload):
                yield event

    async def _job(self, method: str, payload: Any) -> AsyncIterator[JobEvent]:
        avatar_id = serve.get_multiplexed_model_id()
        if avatar_id:
            await self.avatar(avatar_id)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[JobEvent | None] = asyncio.Queue()
        cancel = threading.Event()

        def progress(phase: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("progress", phase, done, total))

        future = loop.run_in_executor(self._threads, self._call, method, payload, progress, cancel)
        future.add_done_callback(lambda _: events.put_nowait(None))
        try:
            yield ("replica", self.replica_id)
            while (event := await events.get()) is not None:
                yield event
            yield future.result()
        finally:
            if not future.done():
                # Cancelled by the ingress: the engine stops at its next batch and cleans up.
                cancel.set()
                await asyncio.wait([future])

    def _call(self, method: str, payload: Any, progress: Progress, cancel: threading.Event) -> JobEvent:
        try:
            if method == "run":
                return ("result", self.engine.run(payload, progress, cancel))
            if method == "prepare_avatar":
                # The avatar's summary, not the avatar: its latents and masks stay on this replica.
                return ("result", self.engine.prepare_avatar(payload, cancel).summary())
            if method == "run_url_task":
                return ("result", self._run_url_task(payload, progress, cancel))
            raise ValueError(f"no engine job {method!r}")
        except (ServiceError, OSError) as e:  # the ingress maps these (codes, disk full)
            return ("error", e)
        except Exception as e:  # noqa: BLE001 - anything else is the engine's fault: logged here
            log.exception("engine replica %s: unexpected error in %s", self.replica_id, method)
            return ("error", ServiceError(f"internal error in engine replica {self.replica_id} ({type(e).__name__}); see its log"))

    def _run_url_task(self, task: UrlTask, progress: Progress, cancel: threading.Event) -> Any:
        """Media by URL: fetched into this replica's work folder, so no disk is shared with the ingress."""
        settings = self.settings
        return fetch_and_run(
            self.engine.run, task, folder=self.work_root / f"musetalk-fetch-{uuid.uuid4().hex}",
            max_bytes=settings.limits.max_upload_bytes, settings=settings.urls,
            check=lambda request, avatar: check_limits(request, settings, avatar), progress=progress, cancel=cancel,
        )

    # -- avatars -------------------------------------------------------------------------------------

    @serve.multiplexed(max_num_models_per_replica=AVATARS_ROUTED_PER_REPLICA)
    async def avatar(self, avatar_id: str) -> str:
        """Ray Serve's model load for an avatar id: the avatar into this replica's memory (from the
        cache folder, if another replica wrote it there). A miss is no error: the job reports it."""
        cache = self.engine.avatars
        if cache is not None:
            await asyncio.get_running_loop().run_in_executor(self._threads, cache.get, avatar_id)
        return avatar_id

    def list_avatars(self) -> list[dict[str, Any]]:
        """This replica's avatars and those other replicas wrote to a shared cache folder."""
        cache = self.engine.avatars
        return cache.list_shared() if cache is not None else []

    def delete_avatar(self, avatar_id: str) -> bool:
        return self.engine.delete_avatar(avatar_id)

    def cache_stats(self) -> dict[str, int] | None:
        cache = self.engine.avatars
        return cache.stats() if cache is not None else None

    # -- health --------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.engine.health()

    def gpu_memory(self) -> dict[str, int] | None:
        return self.engine.gpu_memory()

    async def check_health(self) -> None:
        """Ray Serve's health check: the device answers a tiny op (Ray's timeout bounds a hung GPU)."""
        if not await asyncio.get_running_loop().run_in_executor(self._threads, self.engine.device_ok):
            raise RuntimeError(f"engine replica {self.replica_id}: the device ({self.engine.health()['device']}) failed its check")


