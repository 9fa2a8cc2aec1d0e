"""Probes and lifecycle: /health (liveness) vs /ready (readiness), a GPU that stops answering, a
failed model load, the API key, and the shutdown mode (the drain of a real `serve` process on
SIGTERM is tests/api/test_drain.py)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from musetalk_service.api.app import create_app
from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import ControlledPipeline, assert_error, metric, wait_until
from tests.api.live import live_server


def body(video: Path, audio: Path, **extra) -> dict:
    return {"video_path": str(video), "audio_path": str(audio), "face_box": SMALL_FACE_BOX, **extra}


def test_health_and_ready_once_loaded(serve):
    with serve() as client:
        health = client.get("/health")
        ready = client.get("/ready")

    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["models_loaded"] is True
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "queue_depth": 0, "max_queue": 8, "jobs_running": 0}


def test_ready_is_503_while_the_gpu_does_not_answer_and_health_stays_200(serve, tiny_pipeline):
    pipeline = ControlledPipeline(tiny_pipeline)
    with serve(pipeline=pipeline, ready_timeout_s=0.3) as client:
        assert client.get("/ready").status_code == 200
        pipeline.device_hang.set()
        time.sleep(1.1)  # past the last answer's freshness
        started = time.monotonic()
        hung = [client.get("/ready") for _ in range(5)]
        took = time.monotonic() - started
        health_started = time.monotonic()
        health = client.get("/health")
        health_took = time.monotonic() - health_started
        probe_threads = sum(t.name == "musetalk-device-probe" for t in threading.enumerate())
        pipeline.device_release.set()
        pipeline.device_hang.clear()
        wait_until(lambda: client.get("/ready").status_code == 200, timeout=10, message="ready again")

    for response in hung:
        assert_error(response, 503, "not_ready", "did not answer within 0.3 s")
    assert took < 5 * 0.3 + 2  # each waits the timeout at most: no request hangs on the GPU
    assert health.status_code == 200 and health_took < 1
    assert probe_threads == 1  # one stuck probe, not one per request


def test_ready_is_503_with_the_reason_when_the_models_fail_to_load(tiny_settings, tmp_path):
    failures: list[str] = []
    settings = tiny_settings.model_copy(update={"models_dir": tmp_path / "empty"})
    with live_server(create_app(settings, on_load_failure=failures.append)) as client:
        wait_until(lambda: failures, timeout=30, message="load failure reported")
        ready = client.get("/ready")
        health = client.get("/health")
        submit = client.post("/jobs", json={"video_path": "v.mp4", "audio_path": "a.wav"})

    assert_error(ready, 503, "not_ready", "failed to load", "weights missing")
    assert health.status_code == 200 and health.json()["models_loaded"] is False
    assert_error(submit, 503, "not_ready", "failed to load")
    assert "weights missing" in failures[0]


def test_api_key_guards_every_route_but_health(serve, small_video, short_audio, caplog):
    caplog.set_level(logging.DEBUG)
    key = "s3cr3t-key-value"
    with serve(api_key=key) as client:
        open_health = client.get("/health")
        refused = [
            (path, client.request(method, path, **kwargs))
            for method, path, kwargs in (
                ("GET", "/ready", {}), ("GET", "/metrics", {}), ("POST", "/jobs", {"json": body(small_video, short_audio)}),
                ("POST", "/lipsync", {"json": {}}), ("GET", "/jobs", {}), ("GET", "/jobs/x", {}), ("DELETE", "/jobs/x", {}),
                ("GET", "/avatars", {}), ("POST", "/avatars", {"json": {}}), ("GET", "/docs", {}),
                ("GET", "/openapi.json", {}), ("GET", "/nope", {}),
            )
        ]
        wrong = client.get("/ready", headers={"X-API-Key": "wrong"})
        ok = client.post("/lipsync", json=body(small_video, short_audio), headers={"X-API-Key": key})
        client.headers["X-API-Key"] = key
        counted = metric(client, "musetalk_requests_total", route="/jobs/{job_id}", outcome="unauthorized")
        unmatched = metric(client, "musetalk_requests_total", route="unmatched", outcome="unauthorized")

    assert open_health.status_code == 200
    for path, response in refused:
        assert_error(response, 401, "unauthorized", "X-API-Key")
    assert_error(wrong, 401, "unauthorized", "wrong API key")
    assert ok.status_code == 200, ok.text
    assert counted == 2 and unmatched == 1  # by route template; /nope matches none
    assert key not in caplog.text and key not in ok.text


def test_sigterm_with_shutdown_mode_cancel_cancels_the_running_job(serve, tiny_pipeline, small_video, short_audio):
    pipeline = ControlledPipeline(tiny_pipeline, gated=True)
    servers: list = []
    results: dict[str, httpx.Response] = {}
    with serve(pipeline=pipeline, servers=servers, jobs={"shutdown_mode": "cancel"}) as client:
        request = threading.Thread(target=lambda: results.update(sync=client.post("/lipsync", json=body(small_video, short_audio))))
        request.start()
        wait_until(lambda: len(pipeline.started) == 1, message="job running")
        service = client.app.state.service

        servers[0].handle_exit(signal.SIGTERM, None)  # what uvicorn calls on SIGTERM
        request.join(timeout=30)
        wait_until(lambda: not service.jobs.accepting, message="no new jobs")

    assert_error(results["sync"], 503, "shutting_down", "retry on another instance")
    assert service.stopping


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes_answer_while_a_job_runs(serve, tiny_pipeline, path, small_video, short_audio):
    pipeline = ControlledPipeline(tiny_pipeline, gated=True)
    with serve(pipeline=pipeline) as client:
        job = client.post("/jobs", json=body(small_video, short_audio)).json()["job_id"]
        wait_until(lambda: len(pipeline.started) == 1, message="job running")
        started = time.monotonic()
        response = client.get(path)
        took = time.monotonic() - started
        pipeline.gate.set()
        client.delete(f"/jobs/{job}")

    assert response.status_code == 200 and took < 1


def test_head_on_the_probes_answers_their_status_with_no_body(serve, tiny_settings, tmp_path):
    with serve() as client:
        health = client.head("/health")
        ready = client.head("/ready")
    failures: list[str] = []
    settings = tiny_settings.model_copy(update={"models_dir": tmp_path / "empty"})
    with live_server(create_app(settings, on_load_failure=failures.append)) as client:
        wait_until(lambda: failures, timeout=30, message="load failure reported")
        not_ready = client.head("/ready")

    assert health.status_code == 200 and health.content == b""
    assert ready.status_code == 200 and ready.content == b""
    assert not_ready.status_code == 503 and not_ready.content == b""


def test_a_wrong_method_is_405_naming_every_method_the_path_allows(serve):
    with serve() as client:
        response = client.patch("/jobs/x")

    assert_error(response, 405, "method_not_allowed")
    assert {m.strip() for m in response.headers["allow"].split(",")} >= {"GET", "DELETE"}
