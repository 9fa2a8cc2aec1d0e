"""Faults: ffmpeg killed mid-job, the output disk full, the client going away mid-request or
mid-upload. Each time the job fails cleanly, nothing is left behind, and the next job succeeds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import files_under, metric, wait_job, wait_until
from tests.fixtures.processes import ffmpeg_children


def body(video: Path, audio: Path, **extra) -> dict:
    return {"video_path": str(video), "audio_path": str(audio), "face_box": SMALL_FACE_BOX, **extra}


def assert_clean(tiny_settings, tmp_path: Path, *outputs: Path) -> None:
    """No partial output, no temp files, no ffmpeg left running."""
    for output in outputs:
        assert not output.exists()
        assert list(output.parent.glob(f".{output.name}.*.part")) == []
    assert files_under(Path(tiny_settings.work_dir), tmp_path / "work") == []
    wait_until(lambda: ffmpeg_children() == [], timeout=10, message="every ffmpeg reaped")


def test_ffmpeg_killed_mid_job_fails_it_cleanly_and_the_next_job_succeeds(
    serve, tiny_settings, small_video, short_audio, make_audio, tmp_path
):
    output = tmp_path / "killed.mp4"
    with serve() as client:
        job_id = client.post("/jobs", json=body(small_video, make_audio(2.0), batch_size=1, output_path=str(output))).json()["job_id"]
        wait_until(lambda: client.get(f"/jobs/{job_id}").json()["frames_done"] >= 2, message="two batches done")
        victims = ffmpeg_children()
        for pid, _ in victims:
            os.kill(pid, signal.SIGKILL)
        done = wait_job(client, job_id)
        assert_clean(tiny_settings, tmp_path, output)
        after = client.post("/lipsync", json=body(small_video, short_audio))
        ready = client.get("/ready").status_code

    assert victims, "no ffmpeg was running mid-job"
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "ffmpeg_failed" and "ffmpeg" in done["error"]["message"]
    assert after.status_code == 200, after.text
    assert ready == 200


@contextmanager
def small_disk(folder: Path, kib: int):
    """A size-limited folder: tmpfs when we may mount (root), else an ext4 loop file, else skip."""
    folder.mkdir()
    attempts = [["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)]]
    image = folder.with_suffix(".img")
    attempts.append(["sh", "-c", f"truncate -s {max(kib, 1024)}k {image} && mkfs.ext4 -q {image} && mount -o loop {image} {folder}"])
    reasons = []
    for command in attempts:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            break
        reasons.append(done.stderr.strip() or f"exit {done.returncode}")
    else:
        pytest.skip(f"can't make a size-limited folder here (needs root to mount tmpfs or a loop file): {reasons}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        image.unlink(missing_ok=True)


def test_output_disk_full_fails_the_job_with_507_and_leaves_nothing(serve, tiny_settings, small_video, short_audio, tmp_path):
    with small_disk(tmp_path / "full", kib=64) as full:
        # Fill it but for a few KiB: less than one output needs.
        filler = full / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(filler, max(0, filler.stat().st_size - 4096))
        output = full / "out.mp4"
        with serve(output_roots=[full]) as client:
            response = client.post("/lipsync", json=body(small_video, short_audio, output_path=str(output)))
            assert_clean(tiny_settings, tmp_path, output)
            after = client.post("/lipsync", json=body(small_video, short_audio))
            ready = client.get("/ready").status_code
        assert sorted(p.name for p in full.iterdir()) == ["filler"]

    assert response.status_code == 507, response.text
    assert response.json()["error"]["code"] == "disk_full"
    assert after.status_code == 200, after.text
    assert ready == 200


def _raw_request(port: int, method: str, path: str, body: bytes, content_type: str, length: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_client_disconnecting_mid_request_cancels_its_job(serve, tiny_settings, small_video, short_audio, make_audio, tmp_path):
    output = tmp_path / "abandoned.mp4"
    with serve() as client:
        port = int(str(client.base_url).rsplit(":", 1)[1].strip("/"))
        payload = json.dumps(body(small_video, make_audio(2.0), batch_size=1, output_path=str(output))).encode()
        sock = _raw_request(port, "POST", "/lipsync", payload, "application/json")
        wait_until(lambda: metric(client, "musetalk_jobs_running") == 1, message="the job is running")
        sock.close()  # the client goes away
        wait_until(lambda: metric(client, "musetalk_jobs_total", outcome="cancelled") == 1, message="the job cancelled")
        assert_clean(tiny_settings, tmp_path, output)
        after = client.post("/lipsync", json=body(small_video, short_audio))

    assert after.status_code == 200, after.text


def test_client_disconnecting_mid_upload_leaves_no_upload_behind(serve, tiny_settings, small_video, tmp_path):
    with serve() as client:
        port = int(str(client.base_url).rsplit(":", 1)[1].strip("/"))
        part = (b'--b\r\nContent-Disposition: form-data; name="video"; filename="v.mp4"\r\n\r\n' + small_video.read_bytes()[:5000])
        sock = _raw_request(port, "POST", "/jobs", part, "multipart/form-data; boundary=b", length=10_000_000)
        wait_until(lambda: any(p.is_file() for p in files_under(tmp_path / "work")), message="the upload started")
        sock.close()
        wait_until(lambda: files_under(tmp_path / "work") == [], timeout=10, message="the upload removed")
        ready = client.get("/ready").status_code
        submitted = metric(client, "musetalk_jobs_total", outcome="succeeded") + metric(client, "musetalk_queue_depth")

    assert ready == 200 and submitted == 0
