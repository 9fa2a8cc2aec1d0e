"""JobManager: queue bound, FIFO, cancel, time limit, retention, shutdown, concurrency, logging.

The `run` callable here is real code that honours the pipeline's contract: it reports progress,
works in small "batches", checks `cancel` between them and raises `Cancelled`, and blocks until
the test releases it. No sleeps beyond what a deadline under test needs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

import pytest

from musetalk_service.api.jobs import Job, JobManager, JobNotFound, JobStatus, QueueFull, ShuttingDown
from musetalk_service.errors import Cancelled, NoFace
from musetalk_service.contract import LipsyncRequest, LipsyncResult

WAIT = 5.0  # upper bound for anything that should happen "soon"; tests pass far below it


def req(tag: str) -> LipsyncRequest:
    return LipsyncRequest(video_path=Path("in/v.mp4"), audio_path=Path("in/a.wav"), output_path=Path(f"out/{tag}.mp4"))


def tag_of(request: LipsyncRequest) -> str:
    return request.output_path.stem


def result_for(request: LipsyncRequest, frames: int = 10) -> LipsyncResult:
    timings = {"read": 0.01, "face_detect": 0.02, "unet": 0.03, "blend": 0.01, "encode": 0.01, "total": 0.1}
    return LipsyncResult(
        output_path=request.output_path, frames=frames, fps=25.0, duration_s=frames / 25.0,
        encoder="libx264", weights="random", timings=timings,
    )


class GatedRun:
    """Blocks each job until `release` is set (or `release_one()` lets one through)."""

    def __init__(self, *, honour_cancel: bool = True, batch_s: float = 0.002, work_s: float | None = None):
        self.release = threading.Event()
        self.started: queue.Queue[str] = queue.Queue()
        self.order: list[str] = []
        self.honour_cancel = honour_cancel
        self.batch_s = batch_s
        self.fail: dict[str, Exception] = {}
        self.work_s = work_s
        self._tokens = threading.Semaphore(0)

    def release_one(self) -> None:
        self._tokens.release()

    def __call__(self, request, progress, cancel):
        tag = tag_of(request)
        self.order.append(tag)
        progress("read", 0, 10)
        self.started.put(tag)
        progress("unet", 3, 10)
        if self.work_s is not None:  # a fixed-length job instead of the gate
            if cancel.wait(self.work_s):
                raise Cancelled("stopped between batches")
            return result_for(request)
        while not self.release.is_set() and not self._tokens.acquire(timeout=self.batch_s):
            if self.honour_cancel and cancel.is_set():
                raise Cancelled("stopped between batches")
        if tag in self.fail:
            raise self.fail[tag]
        progress("encode", 10, 10)
        return result_for(request)

    def wait_started(self, tag: str) -> None:
        assert self.started.get(timeout=WAIT) == tag


@pytest.fixture
def thread_baseline():
    """Fails the test if a thread it started outlives it. By identity, not by count: a thread an
    earlier test left winding down may end meanwhile."""
    before = set(threading.enumerate())
    yield before

    def started_here() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before]

    deadline = time.monotonic() + WAIT
    while started_here() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not started_here(), [t.name for t in started_here()]


def make(run, **kw) -> JobManager:
    kw.setdefault("max_queue", 8)
    kw.setdefault("keep_finished_s", 60)
    kw.setdefault("time_limit_s", None)
    return JobManager(run, **kw)


def test_queue_full_raises_429_with_retry_after(thread_baseline):
    run = GatedRun()
    with make(run, max_queue=2, default_job_s=7) as jm:
        a = jm.submit(req("a"))
        run.wait_started("a")
        wait_for_phase(jm, a, "unet")
        jm.submit(req("b"))
        jm.submit(req("c"))
        assert jm.queue_depth == 2
        with pytest.raises(QueueFull) as exc:
            jm.submit(req("d"))
        assert exc.value.status == 429 and exc.value.code == "queue_full"
        # No history yet: b and c, of unknown size, 7 s each; a's 7 frames left at 25 fps, 0.28 s.
        assert exc.value.retry_after_s == 15
        assert "retry in about 15 s" in exc.value.message
        assert jm.queue_depth == 2
        run.release_one()
        assert jm.wait(a.id, WAIT).status is JobStatus.SUCCEEDED
        # With a short job in the history the estimate drops to the 1 s floor.
        run.wait_started("b")
        jm.submit(req("e"))
        with pytest.raises(QueueFull) as exc:
            jm.submit(req("f"))
        assert exc.value.retry_after_s == 1
        run.release.set()


def test_retry_after_is_the_work_ahead_at_the_recent_throughput(thread_baseline):
    run = GatedRun()
    with make(run, max_queue=2, default_fps=10) as jm:
        a = jm.submit(req("a"), frames_total=10)
        run.wait_started("a")
        wait_for_phase(jm, a, "unet")  # 3 frames of 10 done
        b = jm.submit(req("b"), frames_total=100)
        jm.submit(req("c"), frames_total=200)
        assert retry_after(jm) == 31  # (7 + 100 + 200) frames at 10 fps
        jm.cancel(b.id)
        jm.submit(req("e"), frames_total=500)
        assert retry_after(jm) == 71  # (7 + 200 + 500) frames: more work queued, a later retry
        # Once a lip-sync has succeeded, its frames per second replace the default.
        run.release_one()
        assert jm.wait(a.id, WAIT).status is JobStatus.SUCCEEDED
        fps = 10 / max(a.to_dict()["run_s"], 0.001)  # run_s is rounded to the ms
        c = next(job for job in jm.snapshots(JobStatus.RUNNING))
        wait_for_phase(jm, jm.get(c["job_id"]), "unet")  # c reports 7 frames left
        jm.submit(req("f"), frames_total=1000)
        assert abs(retry_after(jm) - (7 + 500 + 1000) / fps) <= 1  # run_s is rounded to the ms
        run.release.set()
    slow = GatedRun()
    with make(slow, max_queue=1, default_fps=0.001) as jm:
        jm.submit(req("g"), frames_total=10)
        slow.wait_started("g")
        jm.submit(req("h"), frames_total=10)
        assert retry_after(jm) == 3600  # clamped: a client is not told to wait for days


def wait_for_phase(jm: JobManager, job: Job, phase: str) -> None:
    deadline = time.monotonic() + WAIT
    while jm.snapshot(job.id)["phase"] != phase:
        assert time.monotonic() < deadline, f"{job.id} never reached {phase}"
        time.sleep(0.001)


def retry_after(jm: JobManager) -> int:
    with pytest.raises(QueueFull) as exc:
        jm.submit(req("refused"))
    return exc.value.retry_after_s


def test_jobs_run_in_submission_order(thread_baseline):
    run = GatedRun()
    with make(run, max_queue=10) as jm:
        tags = [f"j{i}" for i in range(6)]
        jobs = [jm.submit(req(t)) for t in tags]
        run.release.set()
        for job in jobs:
            assert jm.wait(job.id, WAIT).status is JobStatus.SUCCEEDED
        assert run.order == tags


def test_cancel_queued_job_ends_it_at_once_and_it_never_runs(thread_baseline):
    run = GatedRun()
    with make(run) as jm:
        a = jm.submit(req("a"))
        run.wait_started("a")
        b = jm.submit(req("b"))
        assert jm.snapshot(b.id)["queue_position"] == 1
        assert jm.cancel(b.id) is b
        assert b.done.is_set() and b.status is JobStatus.CANCELLED
        assert b.error.code == "cancelled" and b.error.status == 499
        assert jm.queue_depth == 0
        d = b.to_dict()
        assert d["status"] == "cancelled" and d["started_at"] is None and d["run_s"] is None
        run.release.set()
        assert jm.wait(a.id, WAIT).status is JobStatus.SUCCEEDED
        assert run.order == ["a"]
        assert jm.cancel(b.id).status is JobStatus.CANCELLED  # idempotent


def test_cancel_running_job_stops_it_at_next_batch_and_next_job_runs(thread_baseline):
    run = GatedRun()
    with make(run) as jm:
        a = jm.submit(req("a"))
        b = jm.submit(req("b"))
        run.wait_started("a")
        jm.cancel(a.id)
        snap = jm.snapshot(a.id)
        assert snap["cancel_requested"] is True
        assert snap["status"] in ("running", "cancelled")
        assert jm.wait(a.id, WAIT).status is JobStatus.CANCELLED
        assert a.error.code == "cancelled" and "client" in a.error.message
        assert a.to_dict()["run_s"] is not None
        run.wait_started("b")
        run.release.set()
        assert jm.wait(b.id, WAIT).status is JobStatus.SUCCEEDED


def test_running_job_past_time_limit_fails_with_time_limit_exceeded(thread_baseline):
    run = GatedRun()
    with make(run, time_limit_s=0.2) as jm:
        t0 = time.monotonic()
        job = jm.submit(req("slow"))
        assert jm.wait(job.id, WAIT).done.is_set()
        elapsed = time.monotonic() - t0
        assert job.status is JobStatus.FAILED
        assert job.error.code == "time_limit_exceeded" and job.error.status == 504
        assert "0.2 s" in job.error.message
        assert 0.2 <= elapsed < 2.0
        assert job.to_dict()["error"]["code"] == "time_limit_exceeded"


def test_queued_job_past_time_limit_fails_without_starting(thread_baseline):
    run = GatedRun(honour_cancel=False)  # the running job ignores cancel, so the next one stays queued
    with make(run, time_limit_s=0.3) as jm:
        jm.submit(req("hog"))
        run.wait_started("hog")
        waiting = jm.submit(req("waiting"))
        assert jm.wait(waiting.id, WAIT).status is JobStatus.FAILED
        assert waiting.error.code == "time_limit_exceeded" and "never started" in waiting.error.message
        assert waiting.started_at is None and jm.queue_depth == 0
        run.release.set()
    assert run.order == ["hog"]


def test_failures_become_the_job_error_and_the_worker_goes_on(thread_baseline):
    run = GatedRun()
    run.release.set()
    run.fail["noface"] = NoFace("no face found in any frame")
    run.fail["bug"] = RuntimeError("secret internals")
    with make(run) as jm:
        j1, j2, j3 = (jm.submit(req(t)) for t in ("noface", "bug", "ok"))
        for j in (j1, j2, j3):
            jm.wait(j.id, WAIT)
        assert j1.status is JobStatus.FAILED and j1.error.code == "no_face" and j1.error.status == 422
        assert j2.status is JobStatus.FAILED and j2.error.code == "internal_error" and j2.error.status == 500
        assert "secret internals" not in j2.error.message and j2.id in j2.error.message
        assert j3.status is JobStatus.SUCCEEDED


def test_snapshot_reports_phase_frames_and_timings(thread_baseline):
    run = GatedRun()
    with make(run) as jm:
        a = jm.submit(req("a"))
        run.wait_started("a")
        deadline = time.monotonic() + WAIT
        while jm.snapshot(a.id)["phase"] != "unet" and time.monotonic() < deadline:
            time.sleep(0.001)
        snap = jm.snapshot(a.id)
        assert snap["status"] == "running" and snap["phase"] == "unet"
        assert (snap["frames_done"], snap["frames_total"]) == (3, 10)
        assert set(snap["timings"]) == {"starting", "read", "unet"}  # `starting`: until run's first report
        assert snap["result"] is None and snap["error"] is None and snap["started_at"]
        b = jm.submit(req("b"), frames_total=40)
        waiting = jm.snapshot(b.id)
        assert (waiting["phase"], waiting["frames_done"], waiting["frames_total"], waiting["timings"]) == ("queued", 0, 40, {})
        run.release.set()
        jm.wait(a.id, WAIT)
        done = a.to_dict()
        assert done["status"] == "succeeded" and done["frames_done"] == 10
        assert done["timings"] == result_for(req("a")).timings
        assert done["result"]["output_path"] == "out/a.mp4" and done["result"]["frames"] == 10
        json.dumps(done)  # serialisable as is


def test_unknown_job_is_404_job_not_found(thread_baseline):
    with make(GatedRun()) as jm:
        for call in (jm.get, jm.cancel, jm.snapshot, jm.wait):
            with pytest.raises(JobNotFound) as exc:
                call("nope")
            assert exc.value.status == 404 and exc.value.code == "job_not_found"


def test_finished_jobs_are_forgotten_after_keep_finished_s(thread_baseline):
    forgotten: queue.Queue[Job] = queue.Queue()
    run = GatedRun()
    run.release.set()
    with make(run, keep_finished_s=0.1, on_forget=forgotten.put) as jm:
        job = jm.submit(req("a"))
        jm.wait(job.id, WAIT)
        assert jm.get(job.id) is job
        t_done = time.monotonic()
        assert forgotten.get(timeout=WAIT) is job
        assert time.monotonic() - t_done >= 0.05
        with pytest.raises(JobNotFound):
            jm.get(job.id)


def test_a_failing_on_forget_hook_does_not_stop_the_service(thread_baseline):
    calls = []

    def bad_hook(job):
        calls.append(job.id)
        raise OSError("disk gone")

    run = GatedRun()
    run.release.set()
    with make(run, keep_finished_s=0, on_forget=bad_hook) as jm:
        for tag in ("a", "b"):
            job = jm.submit(req(tag))
            assert jm.wait(job.id, WAIT).status is JobStatus.SUCCEEDED
    assert len(calls) == 2


def test_shutdown_finish_lets_running_job_finish_and_cancels_queued(thread_baseline):
    forgotten = []
    run = GatedRun()
    jm = make(run, on_forget=forgotten.append)
    a = jm.submit(req("a"))
    run.wait_started("a")
    b = jm.submit(req("b"))
    outcome = {}
    stopper = threading.Thread(target=lambda: outcome.setdefault("ok", jm.shutdown("finish", timeout=WAIT)))
    stopper.start()
    assert jm.wait(b.id, WAIT).status is JobStatus.CANCELLED
    assert "shutting down" in b.error.message
    with pytest.raises(ShuttingDown) as exc:
        jm.submit(req("late"))
    assert exc.value.status == 503 and exc.value.code == "shutting_down"
    assert a.status is JobStatus.RUNNING
    run.release.set()
    stopper.join(WAIT)
    assert outcome["ok"] is True
    assert a.status is JobStatus.SUCCEEDED
    assert {j.id for j in forgotten} == {a.id, b.id}


def test_shutdown_cancel_stops_running_job(thread_baseline):
    run = GatedRun()
    jm = make(run)
    a = jm.submit(req("a"))
    run.wait_started("a")
    b = jm.submit(req("b"))
    assert jm.shutdown("cancel", timeout=WAIT) is True
    assert a.status is JobStatus.CANCELLED and b.status is JobStatus.CANCELLED
    assert run.order == ["a"]


def test_shutdown_finish_times_out_then_escalates_to_cancel(thread_baseline):
    run = GatedRun()
    jm = make(run)
    a = jm.submit(req("a"))
    run.wait_started("a")
    assert jm.shutdown("finish", timeout=0.05) is False
    assert a.status is JobStatus.RUNNING
    assert jm.shutdown("cancel", timeout=WAIT) is True
    assert a.status is JobStatus.CANCELLED


def test_200_submissions_from_8_threads_each_complete_or_are_refused(thread_baseline):
    run = GatedRun(work_s=0.002)
    n_threads, per_thread = 8, 25
    accepted: list[Job] = []
    refused: list[QueueFull] = []
    lock = threading.Lock()
    start = threading.Barrier(n_threads)
    t0 = time.monotonic()

    def client(i: int) -> None:
        mine, mine_refused = [], []
        start.wait()
        for k in range(per_thread):
            try:
                mine.append(jm.submit(req(f"c{i}_{k}")))
            except QueueFull as e:
                mine_refused.append(e)
        for job in mine:
            jm.wait(job.id, WAIT)
        with lock:
            accepted.extend(mine)
            refused.extend(mine_refused)

    jm = make(run, max_queue=8)
    clients = [threading.Thread(target=client, args=(i,)) for i in range(n_threads)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(30)
    assert not any(t.is_alive() for t in clients), "a client hung"
    assert time.monotonic() - t0 < 10
    assert jm.shutdown("finish", timeout=WAIT) is True

    assert len(accepted) + len(refused) == n_threads * per_thread
    assert len(accepted) >= 8 and refused, (len(accepted), len(refused))
    assert all(j.status is JobStatus.SUCCEEDED for j in accepted)
    assert all(e.retry_after_s >= 1 for e in refused)
    assert sorted(run.order) == sorted(tag_of(j.request) for j in accepted)  # each ran exactly once
    assert len({j.id for j in accepted}) == len(accepted)


def test_job_events_are_logged_as_json_without_request_fields(thread_baseline, caplog):
    run = GatedRun()
    run.release.set()
    with caplog.at_level(logging.DEBUG, logger="musetalk_service.api.jobs"):
        with make(run) as jm:
            job = jm.submit(req("secret-name"))
            jm.wait(job.id, WAIT)
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "musetalk_service.api.jobs"]
    mine = [e for e in events if e["job_id"] == job.id]
    names = [e["event"] for e in mine]
    assert names[:2] == ["job_submitted", "job_started"] and "job_succeeded" in names and "job_phase" in names
    done = next(e for e in mine if e["event"] == "job_succeeded")
    assert done["status"] == "succeeded" and done["timings"]["total"] == 0.1 and "run_s" in done
    assert all("secret-name" not in r.getMessage() for r in caplog.records)
    record = next(r for r in caplog.records if getattr(r, "job_event", {}).get("event") == "job_succeeded")
    assert record.job_event["job_id"] == job.id


def test_constructor_rejects_bad_values():
    with pytest.raises(ValueError):
        JobManager(GatedRun(), max_queue=0, keep_finished_s=1, time_limit_s=None)
    with pytest.raises(ValueError):
        JobManager(GatedRun(), max_queue=1, keep_finished_s=1, time_limit_s=0)
