"""Prometheus metrics for GET /metrics, on a registry of their own.

`ServiceMetrics` owns a dedicated `CollectorRegistry` (never the global one), so each app, and
each test, has its own counters. Series (all prefixed `musetalk_`):

- `requests_total{route,outcome}`: HTTP requests; `route` is the route template ("/jobs/{job_id}",
  never the raw path), `outcome` is "ok" or the error code (`request_outcome`), a bounded set.
- `queue_depth`, `jobs_running`: read from the `JobManager` at scrape time.
- `jobs_total{outcome}`: finished jobs: succeeded, failed, cancelled, timed_out.
- `job_duration_seconds{outcome}`: run time (start to finish) of jobs that started.
- `job_queue_wait_seconds`: submission to start.
- `phase_seconds_total{phase}`: the pipeline's own per-phase seconds of succeeded jobs (keys of
  `contract.PHASES`; `total` and unknown keys are not counted).
- `frames_total`: output frames of succeeded jobs.
- `frames_generated_total`, `frames_silent_total`: of those, the frames whose mouth was generated,
  and the frames passed through as silent (`silence: source`), whose GPU work was saved.
- `output_fps`: output frames per wall second of the last succeeded job (throughput, not the
  video's frame rate).
- `avatar_cache_hits_total`, `avatar_cache_misses_total`: counted by whoever owns the cache.
- `gpu_memory_bytes{kind}`: from a callable read at scrape time; no samples when none is set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from musetalk_service.errors import ServiceError
from musetalk_service.contract import PHASES, LipsyncResult

logger = logging.getLogger(__name__)

GpuMemoryFn = Callable[[], "Mapping[str, float] | float | None"]
"""Returns bytes by kind, e.g. {"allocated": ..., "reserved": ...}; a bare number means "allocated";
None means no GPU."""

JOB_OUTCOMES = ("succeeded", "failed", "cancelled", "timed_out")
_DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
_NS = "musetalk"


def request_outcome(error: BaseException | None) -> str:
    """The `outcome` label for a request: "ok", a `ServiceError`'s code, else "internal_error"."""
    if error is None:
        return "ok"
    if isinstance(error, ServiceError):
        return error.code
    return "internal_error"


class _GpuMemoryCollector:
    def __init__(self, owner: ServiceMetrics):
        self._owner = owner

    def describe(self):
        return [GaugeMetricFamily(f"{_NS}_gpu_memory_bytes", "GPU memory in bytes, by kind.", labels=["kind"])]

    def collect(self):
        family = GaugeMetricFamily(f"{_NS}_gpu_memory_bytes", "GPU memory in bytes, by kind.", labels=["kind"])
        source = self._owner._gpu_memory
        if source is not None:
            try:
                value = source()
            except Exception:  # noqa: BLE001 - a scrape must not fail because the GPU query did
                logger.warning("gpu memory query failed", exc_info=True)
                value = None
            if isinstance(value, Mapping):
                for kind, amount in value.items():
                    family.add_metric([str(kind)], float(amount))
            elif value is not None:
                family.add_metric(["allocated"], float(value))
        yield family


class ServiceMetrics:
    """The service's metrics; see the module doc for the series."""

    def __init__(self, *, gpu_memory: GpuMemoryFn | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, _NS
        self.requests = Counter(
            "requests", "HTTP requests by route template and outcome.", ["route", "outcome"], namespace=ns, registry=r
        )
        self.queue_depth = Gauge("queue_depth", "Jobs waiting for the GPU.", namespace=ns, registry=r)
        self.jobs_running = Gauge("jobs_running", "Jobs running on the GPU (0 or 1).", namespace=ns, registry=r)
        self.jobs = Counter("jobs", "Finished jobs by outcome.", ["outcome"], namespace=ns, registry=r)
        self.job_duration = Histogram(
            "job_duration_seconds", "Run time of jobs that started, by outcome.", ["outcome"],
            namespace=ns, registry=r, buckets=_DURATION_BUCKETS,
        )
        self.queue_wait = Histogram(
            "job_queue_wait_seconds", "Seconds from submission to start.",
            namespace=ns, registry=r, buckets=_WAIT_BUCKETS,
        )
        self.phase_seconds = Counter(
            "phase_seconds", "Seconds per pipeline phase, succeeded jobs.", ["phase"], namespace=ns, registry=r
        )
        self.frames = Counter("frames", "Output frames produced by succeeded jobs.", namespace=ns, registry=r)
        self.frames_generated = Counter(
            "frames_generated", "Output frames of succeeded jobs whose mouth was generated.", namespace=ns, registry=r
        )
        self.frames_silent = Counter(
            "frames_silent", "Output frames of succeeded jobs passed through as silent (nothing generated).",
            namespace=ns, registry=r,
        )
        self.output_fps = Gauge(
            "output_fps", "Output frames per wall second of the last succeeded job.", namespace=ns, registry=r
        )
        self.cache_hits = Counter("avatar_cache_hits", "Avatar cache hits.", namespace=ns, registry=r)
        self.cache_misses = Counter("avatar_cache_misses", "Avatar cache misses.", namespace=ns, registry=r)
        self._gpu_memory = gpu_memory
        r.register(_GpuMemoryCollector(self))
        # Label values known up front are exported at 0 from the start, so rate() has a baseline.
        for outcome in JOB_OUTCOMES:
            self.jobs.labels(outcome)
        for phase in PHASES:
            self.phase_seconds.labels(phase)

    # -- wiring --------------------------------------------------------------------------------

    def bind_jobs(self, *, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        """Read queue depth and running count at scrape time (called by `JobManager`)."""
        self.queue_depth.set_function(queue_depth)
        self.jobs_running.set_function(running)

    def set_gpu_memory_source(self, fn: GpuMemoryFn | None) -> None:
        """Set or replace the GPU memory callable (the pipeline exists only after models load)."""
        self._gpu_memory = fn

    # -- events ----------------------------------------------------------------------------------

    def observe_request(self, route: str, outcome: str) -> None:
        self.requests.labels(route, outcome).inc()

    def job_started(self, queue_wait_s: float) -> None:
        self.queue_wait.observe(max(0.0, queue_wait_s))

    def job_finished(self, outcome: str, run_s: float | None, result: LipsyncResult | None) -> None:
        """One finished job. `run_s` is None for a job that never started."""
        self.jobs.labels(outcome).inc()
        if run_s is not None:
            self.job_duration.labels(outcome).observe(max(0.0, run_s))
        if result is None:
            return
        for phase, seconds in result.timings.items():
            if phase in PHASES and seconds > 0:
                self.phase_seconds.labels(phase).inc(seconds)
        self.frames_generated.inc(result.frames_generated)
        self.frames_silent.inc(result.frames_silent)
        if result.frames > 0:
            self.frames.inc(result.frames)
            wall = result.timings.get("total") or run_s
            if wall:
                self.output_fps.set(result.frames / wall)

    def cache_hit(self, n: int = 1) -> None:
        self.cache_hits.inc(n)

    def cache_miss(self, n: int = 1) -> None:
        self.cache_misses.inc(n)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
