"""SIGTERM drains a real `serve` process: HTTP keeps answering (health 200, ready 503, POSTs 503
before their body is read, job status and outputs readable) until no job runs, then it exits 0."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from musetalk_service.media.probe import probe_video
from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import assert_error, files_under, wait_job, wait_until
from tests.api.live import ServeProcess, serve_process

# 3 frames a batch: the 10-frame clip does not end on a batch boundary, and a cancel is seen
# within a second (the tiny networks run some ten frames a second on an idle CPU).
BATCH = 3


def job_body(video: Path, audio: Path, **extra: object) -> dict[str, object]:
    return {"video_path": str(video), "audio_path": str(audio), "face_box": SMALL_FACE_BOX, "batch_size": BATCH, **extra}


def start_running(serve: ServeProcess, body: dict[str, object]) -> str:
    """Submit `body` and wait until its job runs; its id."""
    response = serve.client.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    wait_job(serve.client, job_id, until=("running",))
    return job_id


def draining(client: httpx.Client) -> bool:
    return client.get("/ready").status_code == 503


def post_announcing_a_huge_body(port: int) -> bytes:
    """POST /jobs announcing 1 GiB of JSON and sending none of it: everything the server sends
    until it closes the connection (a socket timeout if it waits for the body instead)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_sigterm_keeps_serving_http_until_the_running_job_finishes_then_exits_0(
    tiny_models_dir, small_video, make_audio, tmp_path
):
    output = tmp_path / "finished.mp4"
    # No drain timeout in practice: the job runs to its end however loaded the host is.
    env = {"MUSETALK_JOBS__SHUTDOWN_MODE": "finish", "MUSETALK_JOBS__SHUTDOWN_TIMEOUT_S": "3600"}
    with serve_process(tiny_models_dir, tmp_path, **env) as serve:
        client = serve.client
        earlier = client.post("/lipsync", json=job_body(small_video, make_audio(0.2)))
        assert earlier.status_code == 200, earlier.text
        earlier_output = Path(earlier.json()["output_path"]).read_bytes()  # removed with its job at exit
        running = start_running(serve, job_body(small_video, make_audio(2.0), output_path=str(output)))
        queued = client.post("/jobs", json=job_body(small_video, make_audio(0.2))).json()["job_id"]

        serve.process.send_signal(signal.SIGTERM)
        wait_until(lambda: draining(client), timeout=10, message="/ready 503")
        health, head = client.get("/health"), client.head("/health")
        ready = client.get("/ready")
        posts = [
            client.post("/jobs", json=job_body(small_video, make_audio(0.2))),
            client.post("/lipsync", json=job_body(small_video, make_audio(0.2))),
            client.post("/avatars", json={"video_path": str(small_video)}),
            client.post("/jobs", files={"video": ("v.mp4", small_video.read_bytes(), "video/mp4")}),
        ]
        huge = post_announcing_a_huge_body(client.base_url.port)
        running_view = client.get(f"/jobs/{running}").json()
        queued_view = client.get(f"/jobs/{queued}").json()
        download = client.get(f"/jobs/{earlier.json()['job_id']}/output")
        alive_while_running = serve.process.poll() is None

        code = serve.process.wait(timeout=600)
        log = serve.log_text()

    assert health.status_code == 200 and health.json()["status"] == "ok" and head.status_code == 200
    assert_error(ready, 503, "not_ready", "shutting down")
    for response in posts:
        assert_error(response, 503, "shutting_down", "retry on another instance")
    # Answered and closed without reading the announced body.
    assert huge.startswith(b"HTTP/1.1 503") and b"shutting_down" in huge and b"connection: close" in huge.lower()
    assert running_view["status"] == "running" and alive_while_running
    assert queued_view["status"] == "cancelled" and "shutting down" in queued_view["error"]["message"]
    assert download.status_code == 200 and download.content == earlier_output
    assert code == 0, log
    assert probe_video(output).frame_count == 50  # it ran to the end
    # The listener closed only after the job finished.
    assert log.index(f'"event":"job_succeeded","job_id":"{running}"') < log.index("Shutting down")
    assert "Traceback" not in log
    assert files_under(tmp_path / "work") == []


@pytest.mark.parametrize("stop", ["second_sigterm", "shutdown_timeout"])
def test_the_running_job_is_cancelled_by_a_second_sigterm_or_the_drain_timeout_then_exit_0(
    tiny_models_dir, small_video, make_audio, tmp_path, stop
):
    timeout_s = 2.0 if stop == "shutdown_timeout" else 600.0
    output = tmp_path / "never.mp4"
    with serve_process(tiny_models_dir, tmp_path, MUSETALK_JOBS__SHUTDOWN_TIMEOUT_S=str(timeout_s)) as serve:
        client = serve.client
        running = start_running(serve, job_body(small_video, make_audio(30.0), output_path=str(output)))

        serve.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: draining(client), timeout=10, message="/ready 503")
        still_running = client.get(f"/jobs/{running}").json()["status"]
        if stop == "second_sigterm":
            serve.process.send_signal(signal.SIGTERM)
        code = serve.process.wait(timeout=60)
        took = time.monotonic() - signalled
        log = serve.log_text()

    assert still_running == "running"
    assert code == 0, log
    # Within a few batches: the job had at least a minute (750 frames) left.
    assert took < (timeout_s if stop == "shutdown_timeout" else 0) + 30, took
    if stop == "shutdown_timeout":
        assert took >= timeout_s and "outlived the shutdown timeout" in log
    assert f'"event":"job_cancelled","job_id":"{running}"' in log and "Traceback" not in log
    assert not output.exists()
    assert files_under(tmp_path / "work") == []
