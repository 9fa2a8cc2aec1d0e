"""ServiceMetrics: its own registry, the series after real jobs, GPU memory from a callable."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from musetalk_service.api.jobs import JobManager, JobStatus
from musetalk_service.api.metrics import ServiceMetrics, request_outcome
from musetalk_service.errors import Cancelled, NoFace, ServiceError
from musetalk_service.contract import PHASES, LipsyncRequest, LipsyncResult

WAIT = 5.0
HOLDING = threading.Event()


def samples(metrics: ServiceMetrics) -> dict[tuple[str, tuple], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def req(tag: str) -> LipsyncRequest:
    return LipsyncRequest(video_path=Path("v.mp4"), audio_path=Path("a.wav"), output_path=Path(f"{tag}.mp4"))


def run(request, progress, cancel):
    """A pipeline stand-in: the tag says how the job ends; "hold" waits for cancel."""
    tag = request.output_path.stem
    if tag == "noface":
        raise NoFace("no face found")
    if tag == "hold":
        HOLDING.set()
        cancel.wait(WAIT)
        raise Cancelled("stopped")
    timings = {"read": 0.5, "unet": 2.0, "encode": 0.5, "total": 4.0, "not_a_phase": 9.0}
    return LipsyncResult(request.output_path, frames=100, fps=25.0, duration_s=4.0, encoder="libx264",
                         weights="random", timings=timings)


def test_series_after_jobs():
    gpu = {"allocated": 123.0, "reserved": 456.0}
    metrics = ServiceMetrics(gpu_memory=lambda: gpu)
    jm = JobManager(run, max_queue=4, keep_finished_s=60, time_limit_s=None, metrics=metrics)
    try:
        for tag in ("ok1", "ok2", "noface"):
            assert jm.wait(jm.submit(req(tag)).id, WAIT).done.is_set()
        held = jm.submit(req("hold"))
        assert HOLDING.wait(WAIT)
        queued = jm.submit(req("ok3"))
        s = samples(metrics)
        assert s[("musetalk_queue_depth", ())] == jm.queue_depth
        jm.cancel(queued.id)
        jm.cancel(held.id)
        assert jm.wait(held.id, WAIT).status is JobStatus.CANCELLED
    finally:
        assert jm.shutdown("cancel", WAIT)
    metrics.observe_request("/jobs", "ok")
    metrics.observe_request("/jobs", "queue_full")
    metrics.cache_hit()
    metrics.cache_hit()
    metrics.cache_miss()

    s = samples(metrics)
    assert s[("musetalk_jobs_total", (("outcome", "succeeded"),))] == 2
    assert s[("musetalk_jobs_total", (("outcome", "failed"),))] == 1
    assert s[("musetalk_jobs_total", (("outcome", "cancelled"),))] == 2
    assert s[("musetalk_jobs_total", (("outcome", "timed_out"),))] == 0
    assert s[("musetalk_job_duration_seconds_count", (("outcome", "succeeded"),))] == 2
    assert s[("musetalk_job_duration_seconds_count", (("outcome", "cancelled"),))] == 1  # the queued one never ran
    assert s[("musetalk_job_queue_wait_seconds_count", ())] == 4
    assert s[("musetalk_frames_total", ())] == 200
    assert s[("musetalk_phase_seconds_total", (("phase", "unet"),))] == 4.0
    assert s[("musetalk_phase_seconds_total", (("phase", "read"),))] == 1.0
    assert s[("musetalk_phase_seconds_total", (("phase", "mux"),))] == 0  # exported before first use
    assert not any(k[0] == "musetalk_phase_seconds_total" and dict(k[1])["phase"] not in PHASES for k in s)
    assert s[("musetalk_output_fps", ())] == 25.0  # 100 frames / 4.0 s total
    assert s[("musetalk_requests_total", (("outcome", "ok"), ("route", "/jobs")))] == 1
    assert s[("musetalk_requests_total", (("outcome", "queue_full"), ("route", "/jobs")))] == 1
    assert s[("musetalk_avatar_cache_hits_total", ())] == 2
    assert s[("musetalk_avatar_cache_misses_total", ())] == 1
    assert s[("musetalk_gpu_memory_bytes", (("kind", "allocated"),))] == 123
    assert s[("musetalk_gpu_memory_bytes", (("kind", "reserved"),))] == 456
    assert s[("musetalk_queue_depth", ())] == 0
    assert s[("musetalk_jobs_running", ())] == 0


def test_gpu_memory_source_none_number_or_failing():
    metrics = ServiceMetrics()
    assert not any(k[0] == "musetalk_gpu_memory_bytes" for k in samples(metrics))
    metrics.set_gpu_memory_source(lambda: 2048)
    assert samples(metrics)[("musetalk_gpu_memory_bytes", (("kind", "allocated"),))] == 2048

    def broken():
        raise RuntimeError("CUDA error")

    metrics.set_gpu_memory_source(broken)
    assert not any(k[0] == "musetalk_gpu_memory_bytes" for k in samples(metrics))  # scrape still works


def test_each_instance_has_its_own_registry():
    a, b = ServiceMetrics(), ServiceMetrics()
    a.cache_hit(5)
    assert samples(a)[("musetalk_avatar_cache_hits_total", ())] == 5
    assert samples(b)[("musetalk_avatar_cache_hits_total", ())] == 0


@pytest.mark.parametrize(
    ("error", "outcome"),
    [(None, "ok"), (NoFace("x"), "no_face"), (ServiceError("x", code="queue_full", status=429), "queue_full"),
     (KeyError("x"), "internal_error")],
)
def test_request_outcome(error, outcome):
    assert request_outcome(error) == outcome


def test_metrics_are_safe_from_many_threads():
    metrics = ServiceMetrics()

    def hammer():
        for _ in range(500):
            metrics.observe_request("/lipsync", "ok")
            metrics.render()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert samples(metrics)[("musetalk_requests_total", (("outcome", "ok"), ("route", "/lipsync")))] == 2000
