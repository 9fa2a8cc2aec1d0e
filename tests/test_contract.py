"""The api/engine contract: torch-free, and every record and error survives a trip to another process."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import threading
from fractions import Fraction
from pathlib import Path

from musetalk_service.contract import (
    AudioInfo,
    AvatarSummary,
    CancelToken,
    LipsyncRequest,
    LipsyncResult,
    LipsyncTask,
    NoProgress,
    ProgressSink,
    VideoInfo,
)
from musetalk_service.errors import FFmpegError, InvalidOption


@pytest.mark.parametrize("module", ["musetalk_service.contract", "musetalk_service.api.app"])
def test_contract_and_api_import_neither_torch_nor_cv2(module):
    # The API application must run where no GPU stack is installed (a Ray ingress, a CPU proxy).
    code = f"import sys, {module}; print(sorted({{'torch', 'cv2', 'safetensors'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _summary() -> AvatarSummary:
    return AvatarSummary(
        avatar_id="0" * 32, video=Path("/data/in/head.mp4"), frame_count=50, fps=Fraction(30000, 1001), width=64,
        height=48, faces=49, masks=10, created_at=1.5, bytes=1000, options={"fps": "30000/1001"},
    )  # fmt: skip


def test_tasks_and_results_pickle_as_they_are():
    video = VideoInfo(64, 48, Fraction(25), 50, 2.0, "h264", "yuv420p", 0, 0)
    task = LipsyncTask(
        LipsyncRequest(None, Path("a.wav"), Path("o.mp4"), avatar_id="0" * 32, fps=Fraction(30000, 1001)),
        video, AudioInfo("pcm_s16le", 16000, 1, 2.0), avatar=_summary(), job_id="j1",
    )  # fmt: skip
    assert pickle.loads(pickle.dumps(task)) == task
    result = LipsyncResult(Path("o.mp4"), 50, 25.0, 2.0, "libx264", "random", {"read": 0.1, "total": 1.0}, warnings=["w"])
    assert pickle.loads(pickle.dumps(result)) == result


def test_errors_keep_their_fields_across_pickling():
    error = pickle.loads(pickle.dumps(FFmpegError("ffmpeg failed", returncode=1, stderr_tail="disk full")))
    assert (error.code, error.returncode, error.stderr_tail, str(error)) == ("ffmpeg_failed", 1, "disk full", "ffmpeg failed")
    custom = pickle.loads(pickle.dumps(InvalidOption("bad body", code="invalid_request")))
    assert (custom.code, custom.message) == ("invalid_request", "bad body")


def test_avatar_summary_as_clients_see_it():
    row = _summary().to_dict()
    assert row["video"] == "head.mp4" and row["fps"] == "30000/1001" and row["avatar_id"] == "0" * 32
    assert "in_memory" not in row  # tier fields only where the cache listed them


def test_threading_event_and_no_progress_satisfy_the_protocols():
    assert isinstance(threading.Event(), CancelToken)
    assert isinstance(NoProgress(), ProgressSink)
