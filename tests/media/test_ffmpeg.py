"""The ffmpeg runner: binary lookup, failures, timeouts, stderr handling, process hygiene."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction

import pytest

from musetalk_service.errors import FFmpegError, OutputNotWritable
from musetalk_service.media.ffmpeg import FFmpegPipe, ensure_writable_dir, find_ffmpeg, run_ffmpeg
from musetalk_service.media.rates import exact_rate

from tests.fixtures.processes import ffmpeg_children, running

from .conftest import pid_alive


def test_find_ffmpeg_default_is_executable():
    path = find_ffmpeg()
    assert os.path.isfile(path) and os.access(path, os.X_OK)


def test_find_ffmpeg_honours_configured_path(ffmpeg_exe):
    assert find_ffmpeg(ffmpeg_exe) == ffmpeg_exe


def test_find_ffmpeg_rejects_missing_configured_path(tmp_path):
    with pytest.raises(FFmpegError, match="does not exist"):
        find_ffmpeg(str(tmp_path / "no-ffmpeg"))


def test_run_ffmpeg_failure_carries_returncode_and_stderr(ffmpeg_exe, tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(FFmpegError) as info:
        run_ffmpeg(ffmpeg_exe, ["-i", str(missing), "-f", "null", "-"], what="test run")
    err = info.value
    assert err.returncode not in (0, None)
    assert "missing.mp4" in err.stderr_tail
    assert "test run" in err.message and f"exit code {err.returncode}" in err.message
    assert err.stderr_tail in err.message


def test_run_ffmpeg_timeout_kills(ffmpeg_exe):
    started = time.monotonic()
    with pytest.raises(FFmpegError, match="timed out after 0.5 s, killed by SIGKILL") as info:
        run_ffmpeg(
            ffmpeg_exe, ["-re", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25", "-f", "null", "-"], timeout=0.5
        )
    assert time.monotonic() - started < 5
    assert info.value.returncode == -signal.SIGKILL


def test_nostdin_only_without_stdin_pipe(ffmpeg_exe):
    assert "-nostdin" in FFmpegPipe(ffmpeg_exe, ["-version"]).command
    assert "-nostdin" not in FFmpegPipe(ffmpeg_exe, ["-version"], stdin=True).command


def test_chatty_ffmpeg_does_not_deadlock(ffmpeg_exe):
    """Megabytes of debug output on stderr while we read stdout: without the drain thread ffmpeg
    blocks on a full stderr pipe and we block on stdout forever."""
    args = [
        "-debug_ts",
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x64:rate=100:duration=10",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "bgr24",
        "pipe:1",
    ]
    pipe = FFmpegPipe(ffmpeg_exe, args, stdout=True, loglevel="debug")
    watchdog = threading.Timer(60, pipe.kill)
    watchdog.start()
    try:
        with pipe:
            data = pipe.read_all()
    finally:
        watchdog.cancel()
    assert len(data) == 1000 * 64 * 64 * 3
    assert pipe.stderr_bytes > 10 * 65536  # far beyond a pipe buffer
    assert "Exiting with exit code 0" in pipe.stderr_tail  # the tail is the latest output


def test_exception_inside_pipe_kills_and_reaps(ffmpeg_exe):
    with pytest.raises(RuntimeError, match="boom"):
        with FFmpegPipe(
            ffmpeg_exe, ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=25", "-f", "rawvideo", "pipe:1"], stdout=True
        ) as pipe:
            pid = pipe.pid
            raise RuntimeError("boom")
    assert pipe.returncode == -signal.SIGKILL
    assert not pid_alive(pid)


def test_write_to_dead_ffmpeg_raises_ffmpeg_error(ffmpeg_exe):
    args = ["-f", "rawvideo", "-pix_fmt", "gray", "-video_size", "64x64", "-i", "pipe:0", "-f", "null", "-"]
    with pytest.raises(FFmpegError, match="stopped reading its input") as info:
        with FFmpegPipe(ffmpeg_exe, args, stdin=True) as pipe:
            pid = pipe.pid
            os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                pipe.write(bytes(1 << 20))
    assert info.value.returncode == -signal.SIGKILL
    assert not pid_alive(pid)


def test_ensure_writable_dir(tmp_path, readonly_dir):
    assert ensure_writable_dir(tmp_path / "out.mp4") == tmp_path / "out.mp4"
    with pytest.raises(OutputNotWritable, match="does not exist"):
        ensure_writable_dir(tmp_path / "nope" / "out.mp4")
    with pytest.raises(OutputNotWritable, match="is a directory"):
        ensure_writable_dir(tmp_path)
    with pytest.raises(OutputNotWritable, match="not writable"):
        ensure_writable_dir(readonly_dir / "out.mp4")


def test_exact_rate():
    assert exact_rate(30000 / 1001) == Fraction(30000, 1001)
    assert exact_rate(29.97) == Fraction(2997, 100)
    assert exact_rate(25) == 25 and exact_rate("24000/1001") == Fraction(24000, 1001)
    with pytest.raises(ValueError, match="positive"):
        exact_rate(0)


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_GETPIPE_SZ"), reason="Linux pipes only")
def test_frames_are_read_from_a_pipe_of_up_to_1_mb(ffmpeg_exe):
    """Fewer, larger reads per frame: each read hands the GIL over and back."""
    import fcntl
    from pathlib import Path

    expected = min(1 << 20, int(Path("/proc/sys/fs/pipe-max-size").read_text()))
    pipe = FFmpegPipe(ffmpeg_exe, ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=25", "-frames:v", "2", "-f", "rawvideo", "pipe:1"], stdout=True)
    with pipe:
        assert fcntl.fcntl(pipe._proc.stdout.fileno(), fcntl.F_GETPIPE_SZ) == expected
        pipe.read_all()


# A parent process that starts a slow ffmpeg from a thread, lets that thread end, says the pid, waits.
_PARENT = """
import sys, threading, time
from musetalk_service.media.ffmpeg import FFmpegPipe
pipes = []
starter = threading.Thread(target=lambda: pipes.append(FFmpegPipe(sys.argv[1], ["-re", "-f", "lavfi", "-i", "anullsrc=r=8000", "-t", "600", "-f", "null", "-"])))
starter.start(); starter.join()
pipes[0].start()  # from the main thread too: that one lives on
worker = threading.Thread(target=lambda: pipes.append(FFmpegPipe(sys.argv[1], ["-re", "-f", "lavfi", "-i", "anullsrc=r=8000", "-t", "600", "-f", "null", "-"])) or pipes[1].start())
worker.start(); worker.join()
print(pipes[0].pid, pipes[1].pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_ffmpeg_dies_with_its_parent_even_when_the_thread_that_started_it_has_ended(ffmpeg_exe):
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, ffmpeg_exe], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2, "the parent did not start its ffmpegs"
        time.sleep(0.5)
        # The thread that started the second one has ended: it must still run (the signal is armed
        # per thread, and a naive arming from that thread would have killed it).
        alive_before = [running(pid) for pid in pids]
        children = {pid for pid, _ in ffmpeg_children(parent.pid)}
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 2
        while any(running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        survivors = [pid for pid in pids if running(pid)]
    finally:
        for pid in pids if "pids" in locals() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
    assert alive_before == [True, True]
    assert children == set(pids)
    assert survivors == [], "ffmpeg outlived its SIGKILLed parent"
