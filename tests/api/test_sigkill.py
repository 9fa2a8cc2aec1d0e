"""A `serve` process killed with SIGKILL mid-job: no ffmpeg of it survives (the parent-death
signal of media/ffmpeg.py `start_child`), and the next server removes its work folders."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import wait_job, wait_until
from tests.api.live import serve_process
from tests.fixtures.processes import ffmpeg_children, running


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
