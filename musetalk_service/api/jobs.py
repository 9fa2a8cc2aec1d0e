"""Jobs: a bounded FIFO queue in front of the one GPU worker, with cancel, time limit and retention.

`JobManager` owns one worker thread that runs jobs one at a time through the `run` callable
(`LipsyncPipeline.run` in the service, a plain function in tests) and one housekeeper thread that
enforces the per-job time limit and forgets finished jobs after `keep_finished_s`.

Contract with `run(request, progress, cancel)`: it blocks until done and returns a
`LipsyncResult`, raises a `ServiceError`, or raises `errors.Cancelled` soon after `cancel` is set
(between batches), having ended its ffmpeg and removed its partial files. `progress(phase, done,
total)` reports the phase now running and frames done of total. Before its first report a job's
phase is the manager's own: `queued` while it waits, `starting` once `run` has it; its
`frames_total` is what `submit` was told (the output frames the request's check counted), until
`run` reports its own. A phase is credited with the wall time until the next report that names
another phase (approximate "timings so far"; a succeeded job shows the pipeline's own timings
instead). Once cancel has been requested, any failure of `run` is reported as that cancellation
(a pipeline killed mid-write may raise an ffmpeg error rather than `Cancelled`); a `run` that
ignores `cancel` cannot be stopped, and `shutdown` then returns False after its timeout.

Time limit: counted from submission, so it bounds queue wait plus run. A queued job past it fails
at once; a running one gets its cancel event set and ends as failed, code `time_limit_exceeded`.

Threading: one lock guards every job and the queue. Logging, metrics and `on_forget` run outside
it. `Job` fields change under that lock: read them with `Job.to_dict()` (a consistent snapshot),
or read `result`/`error` after `Job.done` is set.

Logging: one line per job event on this module's logger, INFO (`job_submitted`, `job_started`,
`job_succeeded`, `job_failed`, `job_cancelled`, `job_cancel_requested`, `job_time_limit`) and
DEBUG (`job_phase`, `job_forgotten`). The message is a compact JSON object, so it reads the same
under any formatter and goes straight into jq or a log pipeline; the same dict is attached as
`extra={"job_event": {...}}` for a structured formatter. Fields: event, job_id, status, and where
known phase, frames_done, frames_total, queue_wait_s, run_s, timings, error_code, error_message,
queue_depth. Request fields (paths, options) are never logged; no media, no API key.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import statistics
import threading
import time
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import TYPE_CHECKING, Callable, Literal

from musetalk_service.errors import Cancelled, ServiceError
from musetalk_service.contract import LipsyncRequest, LipsyncResult

if TYPE_CHECKING:
    from musetalk_service.api.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
RunFn = Callable[[LipsyncRequest, "ProgressFn | None", "threading.Event | None"], LipsyncResult]
ShutdownMode = Literal["finish", "cancel"]

_RECENT_RUNS = 20
_MAX_RETRY_AFTER_S = 3600
_THROUGHPUT_WEIGHT = 0.3
"""Weight of the latest finished lip-sync in the throughput's moving average: a few jobs settle it."""
DEFAULT_THROUGHPUT_FPS = 25.0
"""Output frames per second assumed before any lip-sync has finished: real time at 25 fps, below
what one GPU does (90-290 fps on an H100), so the first estimates err long, not short."""
_IDLE_WAKE_S = 3600.0
_CANCEL_MESSAGES = {"client": "job cancelled by its client", "shutdown": "job cancelled: the service is shutting down"}


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class QueueFull(ServiceError):
    """The queue in front of the GPU is full; `retry_after_s` is a whole-second estimate for Retry-After."""

    code = "queue_full"
    status = 429

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobNotFound(ServiceError):
    code = "job_not_found"
    status = 404


class ShuttingDown(ServiceError):
    code = "shutting_down"
    status = 503


NO_NEW_JOBS = "the service is shutting down and takes no new jobs; retry on another instance"
"""The message of a submission refused by a shutdown (here, or before its body is read: api/middleware.py)."""


class TimeLimitExceeded(ServiceError):
    code = "time_limit_exceeded"
    status = 504


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


QUEUED_PHASE = "queued"
STARTING_PHASE = "starting"
"""A job's phase before `run` reports one: waiting for the GPU; running, nothing reported yet."""


class Job:
    """One submitted request and what has become of it (see the module doc for thread rules)."""

    def __init__(self, request: LipsyncRequest, lock: threading.Lock, frames_total: int = 0):
        self.id: str = uuid.uuid4().hex
        self.request = request
        self.status = JobStatus.QUEUED
        self.phase: str = QUEUED_PHASE
        self.frames_done = 0
        self.frames_total = frames_total
        self.result: LipsyncResult | None = None
        self.error: ServiceError | None = None
        """Set when failed or cancelled; the sync route can `raise job.error`."""
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.cancel_reason: str | None = None
        """None, or who asked to stop it first: "client", "time_limit", "shutdown"."""
        self.cancel_event = threading.Event()
        """Passed to `run`; set to ask the pipeline to stop at its next batch."""
        self.done = threading.Event()
        """Set once the job is succeeded, failed or cancelled."""
        self._lock = lock
        self._created_mono = time.monotonic()
        self._started_mono: float | None = None
        self._finished_mono: float | None = None
        self._phase_mono: float | None = None
        self._phase_seconds: dict[str, float] = {}

    def to_dict(self) -> dict:
        """A consistent snapshot for GET /jobs/{id}."""
        with self._lock:
            return self._to_dict_locked(time.monotonic(), queue_position=None)

    # -- under the manager's lock ------------------------------------------------------------

    def _queue_wait_s(self, now: float) -> float:
        end = self._started_mono if self._started_mono is not None else (self._finished_mono or now)
        return end - self._created_mono

    def _run_s(self, now: float) -> float | None:
        if self._started_mono is None:
            return None
        return (self._finished_mono or now) - self._started_mono

    def _close_phase(self, now: float) -> None:
        if self._phase_mono is not None:
            self._phase_seconds[self.phase] = self._phase_seconds.get(self.phase, 0.0) + (now - self._phase_mono)
        self._phase_mono = now

    def _timings(self, now: float) -> dict[str, float]:
        if self.result is not None:
            return dict(self.result.timings)
        timings = dict(self._phase_seconds)
        if self.status is JobStatus.RUNNING and self._phase_mono is not None:
            timings[self.phase] = timings.get(self.phase, 0.0) + (now - self._phase_mono)
        return {k: round(v, 3) for k, v in timings.items()}

    def _to_dict_locked(self, now: float, queue_position: int | None) -> dict:
        run_s = self._run_s(now)
        return {
            "job_id": self.id,
            "status": self.status.value,
            "phase": self.phase,
            "frames_done": self.frames_done,
            "frames_total": self.frames_total,
            "cancel_requested": self.cancel_reason is not None,
            "queue_position": queue_position,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "queue_wait_s": round(self._queue_wait_s(now), 3),
            "run_s": None if run_s is None else round(run_s, 3),
            "timings": self._timings(now),
            "result": self.result.to_dict() if self.result is not None else None,
            "error": self.error.to_dict() if self.error is not None else None,
        }


class JobManager:
    """A bounded FIFO queue and `workers` worker threads (one per engine: the embedded GPU runs
    one job at a time; a Ray deployment runs one per engine replica).

    `max_queue` counts jobs waiting (the running one is extra). `keep_finished_s`: how long a
    finished job stays readable before it is forgotten and `on_forget(job)` runs (temp-file
    cleanup); `on_finish(job)` runs once when a job succeeds, fails or is cancelled (callbacks).
    `time_limit_s`: None for no limit. `default_fps` and `default_job_s`: the throughput, and
    the run time of a job of unknown size, assumed for Retry-After (`_retry_after_locked`) until
    jobs have succeeded. Threads start here; call `shutdown` to stop them.
    """

    def __init__(
        self,
        run: RunFn,
        *,
        max_queue: int,
        keep_finished_s: float,
        time_limit_s: float | None,
        metrics: ServiceMetrics | None = None,
        on_forget: Callable[[Job], None] | None = None,
        on_finish: Callable[[Job], None] | None = None,
        default_fps: float = DEFAULT_THROUGHPUT_FPS,
        default_job_s: float = 10.0,
        workers: int = 1,
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if keep_finished_s < 0:
            raise ValueError(f"keep_finished_s must be >= 0, got {keep_finished_s}")
        if time_limit_s is not None and time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0 or None, got {time_limit_s}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._run = run
        self.max_queue = max_queue
        self.keep_finished_s = float(keep_finished_s)
        self.time_limit_s = None if time_limit_s is None else float(time_limit_s)
        self._metrics = metrics
        self._on_forget = on_forget
        self._on_finish = on_finish
        if default_fps <= 0 or default_job_s <= 0:
            raise ValueError(f"default_fps and default_job_s must be > 0, got {default_fps} and {default_job_s}")
        self._default_job_s = default_job_s

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self._running: list[Job] = []
        """Running jobs, oldest start first (at most one per worker)."""
        self._recent_run_s: collections.deque[float] = collections.deque(maxlen=_RECENT_RUNS)
        self._throughput_fps = default_fps
        """Output frames per second of the lip-syncs that succeeded lately (a moving average)."""
        self._throughput_measured = False
        self._accepting = True
        self._worker_stop = False
        self._housekeeper_stop = False

        if metrics is not None:
            metrics.bind_jobs(queue_depth=lambda: self.queue_depth, running=lambda: self.running_count)
        self._workers = [
            threading.Thread(target=self._work, name=f"musetalk-job-worker-{n}", daemon=True) for n in range(workers)
        ]
        self._housekeeper = threading.Thread(target=self._housekeep, name="musetalk-job-housekeeper", daemon=True)
        for worker in self._workers:
            worker.start()
        self._housekeeper.start()

    # -- public API ----------------------------------------------------------------------------

    def submit(self, request: LipsyncRequest, *, frames_total: int = 0) -> Job:
        """Queue a job; `frames_total`: the output frames it will make, where known (0: not yet).
        Raises `QueueFull` (429) or `ShuttingDown` (503)."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDown(NO_NEW_JOBS)
            if len(self._queue) >= self.max_queue:
                retry = self._retry_after_locked(time.monotonic())
                raise QueueFull(
                    f"the queue is full ({self.max_queue} jobs waiting for the GPU); retry in about {retry} s",
                    retry_after_s=retry,
                )
            job = Job(request, self._lock, frames_total)
            self._jobs[job.id] = job
            self._queue.append(job)
            self._changed.notify_all()
            event = self._event_locked(job, "job_submitted")
        self._log(event)
        return job

    def get(self, job_id: str) -> Job:
        """The job, or `JobNotFound` (404) if unknown or already forgotten."""
        with self._lock:
            return self._get_locked(job_id)

    def snapshot(self, job_id: str) -> dict:
        """`get(job_id).to_dict()` plus the job's 1-based queue position while it is queued."""
        with self._lock:
            job = self._get_locked(job_id)
            position = self._queue.index(job) + 1 if job.status is JobStatus.QUEUED else None
            return job._to_dict_locked(time.monotonic(), queue_position=position)

    def snapshots(self, status: JobStatus | None = None, limit: int | None = None) -> list[dict]:
        """Snapshots of the jobs kept, newest first, each as `snapshot` gives it: only those of
        `status` when given, at most `limit` of them."""
        with self._lock:
            now = time.monotonic()
            positions = {job.id: place for place, job in enumerate(self._queue, 1)}
            picked: list[dict] = []
            for job in reversed(self._jobs.values()):  # kept in submission order
                if limit is not None and len(picked) >= limit:
                    break
                if status is None or job.status is status:
                    picked.append(job._to_dict_locked(now, queue_position=positions.get(job.id)))
            return picked

    def cancel(self, job_id: str) -> Job:
        """Cancel: a queued job ends now; a running one is asked to stop at its next batch
        (status stays running, `cancel_requested` true, until the pipeline returns). A finished
        job is left as it is (idempotent)."""
        effects: list[Callable[[], None]] = []
        with self._lock:
            job = self._get_locked(job_id)
            if job.status is JobStatus.QUEUED:
                self._queue.remove(job)
                job.cancel_reason = "client"
                job.cancel_event.set()
                error = Cancelled(_CANCEL_MESSAGES["client"] + " before it started")
                effects.append(self._finish_locked(job, JobStatus.CANCELLED, error=error))
            elif job.status is JobStatus.RUNNING and job.cancel_reason is None:
                job.cancel_reason = "client"
                job.cancel_event.set()
                event = self._event_locked(job, "job_cancel_requested")
                effects.append(functools.partial(self._log, event))
        self._run_effects(effects)
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is finished or `timeout` passes; check `job.done` after. For the
        synchronous route (call it in a worker thread, not on the event loop)."""
        job = self.get(job_id)
        job.done.wait(timeout)
        return job

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the GPU (not counting the running one)."""
        with self._lock:
            return len(self._queue)

    @property
    def running_count(self) -> int:
        with self._lock:
            return len(self._running)

    @property
    def accepting(self) -> bool:
        with self._lock:
            return self._accepting

    def begin_shutdown(self, mode: ShutdownMode = "finish") -> None:
        """Stop taking jobs and cancel the queued ones; with mode "cancel", also ask the running
        job to stop. Does not block, but takes the manager's lock: from a SIGTERM hook, schedule
        it (`loop.call_soon_threadsafe`), never call it inside a raw signal handler, which could
        interrupt the same thread while it holds the lock. Calling it again with "cancel"
        escalates a "finish"."""
        if mode not in ("finish", "cancel"):
            raise ValueError(f"shutdown mode must be 'finish' or 'cancel', got {mode!r}")
        effects: list[Callable[[], None]] = []
        with self._lock:
            self._accepting = False
            self._worker_stop = True
            while self._queue:
                job = self._queue.popleft()
                job.cancel_reason = "shutdown"
                job.cancel_event.set()
                error = Cancelled(_CANCEL_MESSAGES["shutdown"])
                effects.append(self._finish_locked(job, JobStatus.CANCELLED, error=error))
            for running in self._running:
                if mode == "cancel" and running.cancel_reason is None:
                    running.cancel_reason = "shutdown"
                    running.cancel_event.set()
                    event = self._event_locked(running, "job_cancel_requested")
                    effects.append(functools.partial(self._log, event))
            self._changed.notify_all()
        self._run_effects(effects)

    def shutdown(self, mode: ShutdownMode = "finish", timeout: float | None = None) -> bool:
        """`begin_shutdown(mode)`, then wait up to `timeout` for the running job; once the worker
        has stopped, forget every job (running `on_forget`) and stop the housekeeper. True when
        both threads have stopped; False if the running job outlived `timeout` (the time limit
        still applies; call again, e.g. with mode "cancel")."""
        self.begin_shutdown(mode)
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in self._workers):
            return False
        effects: list[Callable[[], None]] = []
        with self._lock:
            for job in list(self._jobs.values()):
                del self._jobs[job.id]
                effects.append(self._forget_effect(job))
            self._housekeeper_stop = True
            self._changed.notify_all()
        self._run_effects(effects)
        self._housekeeper.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self._housekeeper.is_alive()

    def __enter__(self) -> JobManager:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown("cancel")

    # -- worker ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._worker_stop:
                    self._changed.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                now = time.monotonic()
                if self.time_limit_s is not None and now >= job._created_mono + self.time_limit_s:
                    effects = [self._finish_locked(job, JobStatus.FAILED, error=self._queued_time_limit_error())]
                    job = None
                else:
                    self._running.append(job)
                    job.status = JobStatus.RUNNING
                    job.started_at = time.time()
                    job._started_mono = now
                    job.phase = STARTING_PHASE
                    job._phase_mono = now
                    self._changed.notify_all()  # the housekeeper watches its deadline
                    event = self._event_locked(job, "job_started")
                    wait_s = job._queue_wait_s(now)
                    effects = [functools.partial(self._log, event)]
                    if self._metrics is not None:
                        effects.append(functools.partial(self._metrics.job_started, wait_s))
            self._run_effects(effects)
            if job is not None:
                self._run_effects([self._execute(job)])

    def _execute(self, job: Job) -> Callable[[], None]:
        def progress(phase: str, done: int, total: int) -> None:
            self._progress(job, phase, done, total)

        failure: BaseException | None = None
        result: LipsyncResult | None = None
        try:
            result = self._run(job.request, progress, job.cancel_event)
        except BaseException as e:  # noqa: BLE001 - every failure becomes the job's error: a dead
            failure = e  # worker thread would leave this job and every later one waiting forever
            if not isinstance(e, ServiceError):
                logger.error("job %s: unexpected error in the pipeline", job.id, exc_info=True)
        with self._lock:
            self._running.remove(job)
            if failure is None:
                return self._finish_locked(job, JobStatus.SUCCEEDED, result=result)
            if job.cancel_reason == "time_limit":
                error: ServiceError = TimeLimitExceeded(
                    f"the job ran past the time limit of {self.time_limit_s:g} s and was stopped; "
                    "send a shorter clip or ask for a longer job time limit"
                )
                return self._finish_locked(job, JobStatus.FAILED, error=error)
            if job.cancel_reason is not None or isinstance(failure, Cancelled):
                error = Cancelled(_CANCEL_MESSAGES.get(job.cancel_reason or "", str(failure) or "job cancelled"))
                return self._finish_locked(job, JobStatus.CANCELLED, error=error)
            if isinstance(failure, ServiceError):
                return self._finish_locked(job, JobStatus.FAILED, error=failure)
            error = ServiceError(f"internal error ({type(failure).__name__}); see the service log for job {job.id}")
            return self._finish_locked(job, JobStatus.FAILED, error=error)

    def _progress(self, job: Job, phase: str, done: int, total: int) -> None:
        with self._lock:
            if job.status is not JobStatus.RUNNING:
                return
            changed = phase != job.phase
            if changed:
                job._close_phase(time.monotonic())
                job.phase = phase
            job.frames_done = int(done)
            job.frames_total = int(total)
            event = self._event_locked(job, "job_phase") if changed else None
        if event is not None:
            self._log(event, logging.DEBUG)

    # -- housekeeper: time limits and retention -------------------------------------------------

    def _housekeep(self) -> None:
        while True:
            effects: list[Callable[[], None]] = []
            with self._lock:
                if self._housekeeper_stop:
                    return
                now = time.monotonic()
                wake = now + _IDLE_WAKE_S
                limit = self.time_limit_s
                if limit is not None:
                    for job in list(self._queue):
                        deadline = job._created_mono + limit
                        if now >= deadline:
                            self._queue.remove(job)
                            error = self._queued_time_limit_error()
                            effects.append(self._finish_locked(job, JobStatus.FAILED, error=error))
                        else:
                            wake = min(wake, deadline)
                    for job in self._running:
                        if job.cancel_reason is not None:
                            continue
                        deadline = job._created_mono + limit
                        if now >= deadline:
                            job.cancel_reason = "time_limit"
                            job.cancel_event.set()
                            event = self._event_locked(job, "job_time_limit")
                            effects.append(functools.partial(self._log, event))
                        else:
                            wake = min(wake, deadline)
                for job in list(self._jobs.values()):
                    if job._finished_mono is None:
                        continue
                    expiry = job._finished_mono + self.keep_finished_s
                    if now >= expiry:
                        del self._jobs[job.id]
                        effects.append(self._forget_effect(job))
                    else:
                        wake = min(wake, expiry)
                if not effects:
                    # Waiting with the lock held since the scan, so no notify is missed.
                    self._changed.wait(max(0.0, wake - now))
                    continue
            self._run_effects(effects)

    # -- helpers (the *_locked ones need the lock) ----------------------------------------------

    def _get_locked(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(
                f"no job {job_id!r}: unknown, or finished more than {self.keep_finished_s:g} s ago and forgotten"
            )
        return job

    def _queued_time_limit_error(self) -> TimeLimitExceeded:
        return TimeLimitExceeded(
            f"the job waited in the queue past the time limit of {self.time_limit_s:g} s and never started; retry later"
        )

    def _retry_after_locked(self, now: float) -> int:
        """Whole seconds the engines need for the work ahead of a new job (1 to `_MAX_RETRY_AFTER_S`):
        the running jobs' and every queued job's (`_work_left_s_locked`), shared by the workers."""
        ahead = [*self._running, *self._queue]
        seconds = sum(self._work_left_s_locked(job, now) for job in ahead) / len(self._workers)
        return int(min(max(1, math.ceil(seconds)), _MAX_RETRY_AFTER_S))

    def _work_left_s_locked(self, job: Job, now: float) -> float:
        """Seconds until `job` is done: its frames still to do at the recent throughput; for a job
        of unknown size (media by URL, an avatar's preparation), a recent job's typical run time
        less what it has run. Never past its time limit."""
        if job.frames_total > 0:
            left = max(0, job.frames_total - job.frames_done) / self._throughput_fps
        else:
            typical = statistics.median(self._recent_run_s) if self._recent_run_s else self._default_job_s
            left = typical - (now - job._started_mono if job._started_mono is not None else 0.0)
        if self.time_limit_s is not None:
            left = min(left, job._created_mono + self.time_limit_s - now)
        return max(0.0, left)

    def _measure_throughput_locked(self, result: LipsyncResult | None, run_s: float) -> None:
        frames = getattr(result, "frames", 0)  # an avatar's preparation makes none
        if frames <= 0 or run_s <= 0:
            return
        fps = frames / run_s
        if self._throughput_measured:
            fps = (1 - _THROUGHPUT_WEIGHT) * self._throughput_fps + _THROUGHPUT_WEIGHT * fps
        self._throughput_fps, self._throughput_measured = fps, True

    def _finish_locked(
        self, job: Job, status: JobStatus, *, result: LipsyncResult | None = None, error: ServiceError | None = None
    ) -> Callable[[], None]:
        now = time.monotonic()
        job._close_phase(now)
        job.status = status
        job.result = result
        job.error = error
        job.finished_at = time.time()
        job._finished_mono = now
        run_s = job._run_s(now)
        if status is JobStatus.SUCCEEDED and run_s is not None:
            self._recent_run_s.append(run_s)
            self._measure_throughput_locked(result, run_s)
        job.done.set()
        self._changed.notify_all()
        event = self._event_locked(job, f"job_{status.value}")
        outcome = "timed_out" if isinstance(error, TimeLimitExceeded) else status.value

        def effect() -> None:
            self._log(event)
            if self._metrics is not None:
                self._metrics.job_finished(outcome, run_s, result)
            if self._on_finish is not None:
                self._on_finish(job)

        return effect

    def _forget_effect(self, job: Job) -> Callable[[], None]:
        def effect() -> None:
            self._log({"event": "job_forgotten", "job_id": job.id, "status": job.status.value}, logging.DEBUG)
            if self._on_forget is not None:
                self._on_forget(job)

        return effect

    def _event_locked(self, job: Job, name: str) -> dict:
        now = time.monotonic()
        event: dict = {"event": name, "job_id": job.id, "status": job.status.value, "phase": job.phase}
        if job.frames_total:
            event["frames_done"] = job.frames_done
            event["frames_total"] = job.frames_total
        event["queue_wait_s"] = round(job._queue_wait_s(now), 3)
        run_s = job._run_s(now)
        if run_s is not None:
            event["run_s"] = round(run_s, 3)
        if job.status.finished and job.status is not JobStatus.CANCELLED:
            event["timings"] = job._timings(now)
        if job.error is not None:
            event["error_code"] = job.error.code
            event["error_message"] = job.error.message
        event["queue_depth"] = len(self._queue)
        return event

    @staticmethod
    def _log(event: dict, level: int = logging.INFO) -> None:
        logger.log(level, json.dumps(event, separators=(",", ":"), default=str), extra={"job_event": event})

    @staticmethod
    def _run_effects(effects: list[Callable[[], None]]) -> None:
        # Outside the lock. A failing hook (metrics, on_forget, a log handler) must not kill the
        # worker or housekeeper thread, or every later job would hang.
        for effect in effects:
            try:
                effect()
            except Exception:  # noqa: BLE001
                logger.exception("job manager: a hook failed")
