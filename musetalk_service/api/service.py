"""What the routes share: the pipeline (once loaded), the job queue, metrics, path policy, owned files.

`Service` is built by `create_app` and lives in `app.state.service`. Its lifecycle:

- `start()` (in the app's lifespan, on the event loop): the `JobManager` starts; the models load
  in a thread of their own unless a loaded pipeline was given, so the process answers `/health`
  at once and `/ready` says 503 until they are loaded and warmed.
- `begin_shutdown(mode)` (SIGTERM, via `ServiceServer`): the drain. No new jobs, queued ones
  cancelled, the running one finished or cancelled; `/ready` says 503, POSTs 503 `shutting_down`,
  while every other route keeps answering. `drained()` turns true once no job runs (the running
  one ended, or was cancelled at `jobs.shutdown_timeout_s`); the server then stops listening.
- `stop()` (lifespan end): waits up to `jobs.shutdown_timeout_s` for the running job, then cancels it
  (after a drain there is none left).

Files a job owns: an upload folder (removed as soon as the job ends, or is forgotten if it never
ran), an auto-named output (removed when the job is forgotten), an uploaded avatar video (kept
only while an avatar uses it). Explicit `output_path`s belong to the client and are never removed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musetalk_service import work_folders
from musetalk_service.api.callbacks import CallbackSender
from musetalk_service.api.errors import DiskFull, NotReady
from musetalk_service.api.jobs import Job, JobManager, ShutdownMode
from musetalk_service.api.metrics import ServiceMetrics
from musetalk_service.api.paths import PathPolicy
from musetalk_service.api.remote_media import UrlTask, fetch_and_run
from musetalk_service.errors import FFmpegError, ServiceError
from musetalk_service.contract import LipsyncRequest, LipsyncTask
from musetalk_service.settings import Settings

log = logging.getLogger(__name__)

AVATAR_VIDEOS = "musetalk-avatar-videos"


def path_policy(settings: Settings) -> PathPolicy:
    """Input and output roots from the settings; `output_dir` is an output root too when roots are set.

    Raises ValueError naming a root that is not an existing folder.
    """
    outputs = list(settings.output_roots)
    if outputs:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        outputs.append(settings.output_dir)
    return PathPolicy(settings.input_roots, outputs)


@dataclass(frozen=True, eq=False)
class AvatarTask:
    """A job that prepares an avatar instead of a lip-sync (the GPU queue runs both kinds)."""

    request: LipsyncRequest
    """The video and preparation options (`output_path` is unused)."""


@dataclass(frozen=True)
class AvatarResult:
    """What an avatar job returns, shaped like a lip-sync result where the job manager reads one."""

    avatar: dict[str, Any]
    timings: dict[str, float]
    frames: int = 0  # no output frames: /metrics counts lip-sync frames only
    frames_generated: int = 0
    frames_silent: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.avatar)


@dataclass
class JobFiles:
    upload_dir: Path | None = None
    """Removed as soon as the job ends (its inputs are no longer needed)."""
    auto_output: Path | None = None
    """An output the service named: removed when the job is forgotten."""
    avatar_video: Path | None = None
    """An uploaded avatar video: kept only if the prepared avatar refers to it."""
    keep_avatar_video: bool = False


class DeviceProbe:
    """Asks the pipeline's device a tiny question in a thread, at most one at a time, with a timeout.

    A GPU that has stopped answering leaves that thread blocked; no other is started while it is,
    so probes never pile up threads, and readiness stays false until it answers.
    """

    def __init__(self, timeout_s: float, fresh_s: float = 1.0):
        self.timeout_s = timeout_s
        self.fresh_s = fresh_s
        self._lock = threading.Lock()
        self._done: threading.Event | None = None
        self._started = 0.0
        self._answer = False
        self._checked = -1e9

    async def ok(self, check: Callable[[], bool]) -> bool:
        with self._lock:
            now = time.monotonic()
            done = self._done
            if done is None:
                if now - self._checked < self.fresh_s:
                    return self._answer
                done = self._done = threading.Event()
                self._started = now
                threading.Thread(target=self._run, args=(check, done), name="musetalk-device-probe", daemon=True).start()
            deadline = self._started + self.timeout_s
        delay = 0.002
        while not done.is_set():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        with self._lock:
            return self._answer

    def _run(self, check: Callable[[], bool], done: threading.Event) -> None:
        try:
            answer = bool(check())
        except Exception:  # noqa: BLE001 - a failing device is a not-ready one
            log.warning("device probe failed", exc_info=True)
            answer = False
        with self._lock:
            self._answer = answer
            self._checked = time.monotonic()
            self._done = None
        done.set()


class Service:
    """See the module doc."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Any = None,
        *,
        ready_timeout_s: float = 5.0,
        on_load_failure: Callable[[str], None] | None = None,
        concurrency: int = 1,
    ):
        self.settings = settings
        self.concurrency = concurrency
        """Jobs run at once: 1 in one process; one per engine replica on Ray Serve."""
        self.paths = path_policy(settings)
        self.metrics = ServiceMetrics(gpu_memory=self._gpu_memory)
        self.pipeline = pipeline
        self.load_error: str | None = None
        self.jobs: JobManager | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self._drain_deadline: float | None = None
        """When a drain cancels the running job (monotonic seconds); None until `begin_shutdown`."""
        self._drain_cancelled = False
        self.work_root = Path(settings.work_dir) if settings.work_dir is not None else Path(tempfile.gettempdir())
        self._on_load_failure = on_load_failure
        self._probe = DeviceProbe(ready_timeout_s)
        self._files: dict[int, tuple[object, JobFiles]] = {}
        self._files_lock = threading.Lock()
        self._cache_seen = {"hits": 0, "misses": 0}
        self._cache_lock = threading.Lock()
        self.callbacks = CallbackSender(settings.urls)
        self.check_limits: Callable[[LipsyncRequest, dict[str, Any] | None], LipsyncTask] | None = None
        """Holds fetched media to the limits (api/requests.py's check, set by `create_app`)."""

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            work_folders.sweep(self.work_root)  # left by a server that was killed mid-job
        except OSError:
            log.warning("could not tidy the work folder %s", self.work_root, exc_info=True)
        jobs = self.settings.jobs
        self.jobs = JobManager(
            self._execute,
            max_queue=jobs.max_queue,
            keep_finished_s=jobs.keep_finished_s,
            time_limit_s=jobs.time_limit_s,
            metrics=self.metrics,
            on_forget=self._forget,
            on_finish=self._finished,
            workers=self.concurrency,
        )
        if self.pipeline is not None:
            self._loaded(self.pipeline)
        else:
            threading.Thread(target=self._load, name="musetalk-load", daemon=True).start()

    def _load(self) -> None:
        from musetalk_service.pipeline.runner import LipsyncPipeline

        try:
            pipeline = LipsyncPipeline.load(self.settings)
        except Exception as e:  # noqa: BLE001 - reported by /ready and the serve command
            message = e.message if isinstance(e, ServiceError) else f"{type(e).__name__}: {e}"
            log.error("the models failed to load: %s", message, exc_info=not isinstance(e, ServiceError))
            self.load_error = message
            if self._on_load_failure is not None:
                self._on_load_failure(message)
            return
        self._loaded(pipeline)

    def _loaded(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        try:
            self.collect_avatar_videos()
        except Exception:  # noqa: BLE001 - housekeeping must not stop the service
            log.warning("could not tidy the uploaded avatar videos", exc_info=True)

    def begin_shutdown(self, mode: ShutdownMode) -> None:
        """Start (or escalate) the drain: no new jobs; queued ones cancelled; the running one
        finishes (`mode` "finish", cancelled once `jobs.shutdown_timeout_s` has passed) or is
        cancelled now ("cancel"). On the event loop: `drained()` reads what this sets."""
        now = time.monotonic()
        if self._drain_deadline is None:
            self._drain_deadline = now + self.settings.jobs.shutdown_timeout_s
        if mode == "cancel":
            # From here the pipeline gets the same grace to stop as after the timeout.
            self._drain_deadline = min(self._drain_deadline, now)
            self._drain_cancelled = True
        self.stopping = True
        if self.jobs is not None:
            self.jobs.begin_shutdown(mode)

    def drained(self) -> bool:
        """Whether a drain is over: no job runs any more. Past `jobs.shutdown_timeout_s` it
        cancels the running job, and gives up waiting `_CANCEL_GRACE_S` later (a pipeline that
        ignores its cancel, e.g. a hung GPU, must not keep the process alive). False while not
        draining. Cheap: the server asks on every tick."""
        deadline = self._drain_deadline
        if deadline is None:
            return False
        if self.jobs is None or self.jobs.running_count == 0:
            return True
        now = time.monotonic()
        if now < deadline:
            return False
        if not self._drain_cancelled:
            self._drain_cancelled = True
            log.warning("the running job outlived the shutdown timeout (%g s): cancelling it", self.settings.jobs.shutdown_timeout_s)
            self.jobs.begin_shutdown("cancel")
        if now < deadline + _CANCEL_GRACE_S:
            return False
        log.error("the running job did not stop within %g s of its cancel; exiting anyway", _CANCEL_GRACE_S)
        return True

    def stop(self) -> None:
        """Blocking: wait for the running job (up to `jobs.shutdown_timeout_s`), then cancel it."""
        if self.jobs is None:
            return
        settings = self.settings.jobs
        self.stopping = True
        if not self.jobs.shutdown(settings.shutdown_mode, timeout=settings.shutdown_timeout_s):
            log.warning("the running job outlived the shutdown timeout (%g s): cancelling it", settings.shutdown_timeout_s)
            if not self.jobs.shutdown("cancel", timeout=_CANCEL_GRACE_S):
                log.error("the running job did not stop within %g s of its cancel; exiting anyway", _CANCEL_GRACE_S)
        self.callbacks.close(timeout=_CALLBACK_GRACE_S)

    # -- readiness -----------------------------------------------------------------------------------

    def require_loaded(self) -> Any:
        """The pipeline, or 503 not_ready."""
        if self.load_error is not None:
            raise NotReady(f"the models failed to load: {self.load_error}")
        if self.pipeline is None:
            raise NotReady("the models are still loading; retry in a few seconds")
        return self.pipeline

    async def not_ready_reason(self) -> str | None:
        """None when ready (models loaded and warmed, the device answers, taking jobs)."""
        if self.stopping or (self.jobs is not None and not self.jobs.accepting):
            return "the service is shutting down"
        try:
            pipeline = self.require_loaded()
        except NotReady as e:
            return e.message
        replicas = self.replica_counts()
        if replicas is not None:
            if replicas.ready == 0:
                return f"no engine replica is ready (0 of {replicas.total}): starting, or failing Ray's health check"
            return None
        check = getattr(pipeline, "device_ok", None)
        if check is not None and not await self._probe.ok(check):
            return f"the device ({pipeline.health()['device']}) did not answer within {self._probe.timeout_s:g} s"
        return None

    # -- jobs ----------------------------------------------------------------------------------------

    def submit(self, request: object, files: JobFiles, *, frames_total: int = 0) -> Job:
        """Queue `request` (a LipsyncTask, UrlTask, LipsyncRequest or AvatarTask) owning `files`; on refusal the files go.
        `frames_total`: the output frames it will make, where the check knows them (else 0)."""
        assert self.jobs is not None
        self.require_loaded()
        with self._files_lock:
            self._files[id(request)] = (request, files)
        try:
            return self.jobs.submit(request, frames_total=frames_total)  # type: ignore[arg-type]
        except BaseException:
            self._release(request, forget=True)
            raise

    def _execute(self, request: object, progress, cancel) -> Any:
        """The job manager's `run`: the pipeline, with disk-full made clear and inputs released."""
        pipeline = self.pipeline
        try:
            if isinstance(request, AvatarTask):
                return self._prepare_avatar(pipeline, request, cancel)
            if isinstance(request, UrlTask):
                return self._run_url_task(pipeline, request, progress, cancel)
            if isinstance(request, LipsyncTask):
                return pipeline.run(request.request, progress, cancel).with_warnings(request.warnings)
            return pipeline.run(request, progress, cancel)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFull(_DISK_FULL) from e
            raise
        except FFmpegError as e:
            if "No space left on device" in f"{e.message}\n{e.stderr_tail}":
                raise DiskFull(_DISK_FULL) from e
            raise
        finally:
            self._release(request, forget=False)

    def _run_url_task(self, pipeline: Any, task: UrlTask, progress, cancel) -> Any:
        """Fetch, check, run, upload (remote_media.fetch_and_run): here, or where the engine runs
        when it offers `run_url_task` (a Ray replica fetches its media itself)."""
        remote = getattr(pipeline, "run_url_task", None)
        if remote is not None:
            return remote(task, progress, cancel)
        assert self.check_limits is not None
        return fetch_and_run(
            pipeline.run, task, folder=self.upload_folder(), max_bytes=self.settings.limits.max_upload_bytes,
            settings=self.settings.urls, check=self.check_limits, progress=progress, cancel=cancel,
        )

    def _finished(self, job: Job) -> None:
        """The job manager's `on_finish`: the final status to the job's `callback_url`, if any."""
        task = job.request
        if isinstance(task, UrlTask) and task.urls.callback_url is not None:
            self.callbacks.send(task.urls.callback_url, job_view(job.to_dict()))

    def _prepare_avatar(self, pipeline: Any, task: AvatarTask, cancel) -> AvatarResult:
        started = time.perf_counter()
        avatar = pipeline.prepare_avatar(task.request, cancel)
        files = self._files_of(task)
        if files is not None and files.avatar_video is not None:
            files.keep_avatar_video = Path(avatar.video) == files.avatar_video.resolve()
        return AvatarResult(avatar_summary(avatar.summary()), {"total": round(time.perf_counter() - started, 4)})

    def _files_of(self, request: object) -> JobFiles | None:
        with self._files_lock:
            entry = self._files.get(id(request))
        return entry[1] if entry is not None else None

    def _forget(self, job: Job) -> None:
        self._release(job.request, forget=True)

    def _release(self, request: object, *, forget: bool) -> None:
        """Inputs go when the job ends; the auto-named output when it is forgotten."""
        with self._files_lock:
            entry = self._files.get(id(request))
            if entry is None:
                return
            files = entry[1]
            if forget:
                del self._files[id(request)]
        if files.upload_dir is not None:
            work_folders.remove(files.upload_dir)
        video, files.avatar_video = files.avatar_video, None
        if video is not None and not files.keep_avatar_video:
            video.unlink(missing_ok=True)
            self._tidy_avatar_videos_dir()
        # A kept avatar video now belongs to its avatar: `collect_avatar_videos` removes it once
        # no avatar refers to it.
        if forget and files.auto_output is not None:
            files.auto_output.unlink(missing_ok=True)

    # -- files -----------------------------------------------------------------------------------------

    def upload_folder(self) -> Path:
        """A new folder for one request's uploads or downloads, held by this process until
        `work_folders.remove` (a server started after this one died removes it)."""
        return work_folders.make(self.work_root)

    def avatar_video_path(self, suffix: str) -> Path:
        folder = self.work_root / AVATAR_VIDEOS
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{uuid.uuid4().hex}{suffix}"

    def collect_avatar_videos(self) -> None:
        """Remove uploaded avatar videos that no avatar refers to (evicted or deleted ones)."""
        folder = self.work_root / AVATAR_VIDEOS
        if not folder.is_dir() or self.pipeline is None:
            return
        used = {str(Path(row.get("video", ""))) for row in self.pipeline.list_avatars()}
        with self._files_lock:
            pending = {str(f.avatar_video.resolve()) for _, f in self._files.values() if f.avatar_video is not None}
        for path in folder.iterdir():
            resolved = str(path.resolve())
            if resolved not in used and resolved not in pending:
                path.unlink(missing_ok=True)
        self._tidy_avatar_videos_dir()

    def _tidy_avatar_videos_dir(self) -> None:
        try:
            (self.work_root / AVATAR_VIDEOS).rmdir()  # only when empty
        except OSError:
            pass

    # -- metrics sources -----------------------------------------------------------------------------

    def replica_counts(self) -> Any:
        """Engine replicas (`ready`, `total`) where the engine is a Ray Serve deployment; else None."""
        read = getattr(self.pipeline, "replica_counts", None)
        return read() if read is not None else None

    def _gpu_memory(self) -> Any:
        read = getattr(self.pipeline, "gpu_memory", None)
        return read() if read is not None else None

    def sync_cache_metrics(self) -> None:
        """Carry the avatar cache's hit and miss counts into the Prometheus counters."""
        cache = getattr(self.pipeline, "avatars", None)
        if cache is None or not hasattr(cache, "stats"):
            return
        stats = cache.stats()
        with self._cache_lock:
            for name, inc in (("hits", self.metrics.cache_hit), ("misses", self.metrics.cache_miss)):
                delta = int(stats.get(name, 0)) - self._cache_seen[name]
                if delta > 0:
                    inc(delta)
                    self._cache_seen[name] += delta


_CANCEL_GRACE_S = 30.0
"""How long shutdown waits for a cancelled job's pipeline to stop before exiting anyway."""
_CALLBACK_GRACE_S = 10.0
"""How long shutdown waits for callbacks still being retried."""


def job_view(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A job's snapshot as `GET /jobs/{job_id}` answers it (and a callback sends it)."""
    url = f"/jobs/{snapshot['job_id']}"
    result = snapshot["result"]
    local = snapshot["status"] == "succeeded" and result and "output_path" in result and "output_uploaded_to" not in result
    return {**snapshot, "status_url": url, "output_url": f"{url}/output" if local else None}


_DISK_FULL = "no space left on the disk of the output or work folder; the job stopped and removed its partial files"


def avatar_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """An avatar's facts for clients: `avatar_id`, and the video's file name only."""
    row = dict(summary)
    row["avatar_id"] = row.pop("key")
    if row.get("video"):
        row["video"] = os.path.basename(row["video"])
    return row
