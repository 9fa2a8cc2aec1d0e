"""A `serve` process killed with SIGKILL mid-job: no ffmpeg of it survives (the parent-death
signal of media/ffmpeg.py `start_child`), and the next server removes its work folders."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import wait_job, wait_until
from tests.api.live import serve_process
from tests.fixtures.processes import ffmpeg_children, running

from musetalk_service.work_folders import WORK_PREFIX


def long_wav(ffmpeg: str, path: Path, seconds: int) -> Path:
    """A mono 16 kHz WAV tone of `seconds` (made in well under a second by ffmpeg's lavfi):
    a track the service must encode to AAC for the MP4, which takes it seconds."""
    subprocess.run(
        [ffmpeg, "-v", "error", "-f", "lavfi", "-i", f"sine=frequency=220:sample_rate=16000:duration={seconds}",
         "-ac", "1", "-c:a", "pcm_s16le", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    return path


def test_sigkill_of_the_server_mid_aac_encode_leaves_no_ffmpeg_running(tiny_models_dir, small_video, ffmpeg_exe, tmp_path):
    audio = long_wav(ffmpeg_exe, tmp_path / "long.wav", 20 * 60)
    body = {"video_path": str(small_video), "audio_path": str(audio), "face_box": SMALL_FACE_BOX, "batch_size": 3}
    with serve_process(tiny_models_dir, tmp_path) as serve:
        response = serve.client.post("/jobs", json=body)
        assert response.status_code == 202, response.text
        server = serve.process.pid
        wait_until(lambda: any("audio.m4a" in cmd for _, cmd in ffmpeg_children(server)), timeout=120, message="the AAC encoder runs")
        children = ffmpeg_children(server)
        encoding_at_kill = [pid for pid, cmd in children if "audio.m4a" in cmd and running(pid)]

        serve.process.send_signal(signal.SIGKILL)
        serve.process.wait(timeout=10)
        killed = time.monotonic()
        wait_until(lambda: not any(running(pid) for pid, _ in children), timeout=10, message="every ffmpeg of the server gone")
        took = time.monotonic() - killed

    assert encoding_at_kill  # the 20-minute track was still being encoded
    assert took < 2, took


def work_folders_in(root: Path) -> set[Path]:
    return {p for p in root.iterdir() if p.name.startswith(WORK_PREFIX)}


def test_a_new_server_removes_the_work_folder_of_a_killed_one_but_not_a_live_ones(tiny_models_dir, small_video, make_audio, tmp_path):
    work = tmp_path / "work"
    shared = {"MUSETALK_WORK_DIR": str(work)}

    def start_job(serve, seconds: float) -> tuple[str, Path]:
        before = work_folders_in(work) if work.exists() else set()
        body = {"video_path": str(small_video), "audio_path": str(make_audio(seconds)), "face_box": SMALL_FACE_BOX, "batch_size": 3}
        job_id = serve.client.post("/jobs", json=body).json()["job_id"]
        wait_job(serve.client, job_id, until=("running",))
        wait_until(lambda: work_folders_in(work) - before, message="its work folder")
        (folder,) = work_folders_in(work) - before
        return job_id, folder

    with serve_process(tiny_models_dir, tmp_path / "live", **shared) as live:
        with serve_process(tiny_models_dir, tmp_path / "killed", **shared) as killed:
            _, dead_folder = start_job(killed, 30.0)
            live_job, live_folder = start_job(live, 15.0)
            killed.process.send_signal(signal.SIGKILL)
            killed.process.wait(timeout=10)
        left_behind = dead_folder.is_dir()
        with serve_process(tiny_models_dir, tmp_path / "next", **shared):
            live_status = live.client.get(f"/jobs/{live_job}").json()["status"]
            dead_after, live_after = dead_folder.exists(), live_folder.is_dir()
        finished = wait_job(live.client, live_job, timeout=600)

    assert left_behind  # SIGKILL left it
    assert not dead_after  # the next server removed it at start
    assert live_status == "running" and live_after  # the live server's, in use, was left alone
    assert finished["status"] == "succeeded", finished
    assert not live_folder.exists()


def test_a_new_server_removes_the_upload_folder_of_a_server_killed_mid_upload(tiny_models_dir, tmp_path):
    work = tmp_path / "work"
    shared = {"MUSETALK_WORK_DIR": str(work)}
    boundary = "musetalk-test-boundary"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n"
        "Content-Type: video/mp4\r\n\r\n"
    ).encode() + b"\0" * 65536

    with serve_process(tiny_models_dir, tmp_path / "killed", **shared) as killed:
        port = killed.client.base_url.port
        with socket.create_connection(("127.0.0.1", port)) as upload:
            upload.sendall(
                f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {100 * 2**20}\r\n\r\n".encode() + head
            )
            # The video part is being written into the request's upload folder when the server dies.
            wait_until(lambda: work.is_dir() and any(any(f.iterdir()) for f in work_folders_in(work)), message="an upload folder with a part")
            (folder,) = work_folders_in(work)
            killed.process.send_signal(signal.SIGKILL)
            killed.process.wait(timeout=10)
    left_behind = folder.is_dir()
    with serve_process(tiny_models_dir, tmp_path / "next", **shared):
        after = folder.exists()

    assert left_behind  # SIGKILL left the half-received upload
    assert not after  # the next server removed it at start
