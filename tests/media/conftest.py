"""Helpers for the media tests: files with known content made with the real ffmpeg."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from musetalk_service.media.decode import VideoReader
from musetalk_service.media.encode import EncoderChoice, VideoEncoder, encoder_for
from musetalk_service.media.ffmpeg import file_arg, run_ffmpeg
from musetalk_service.media.probe import probe_video
from musetalk_service.settings import EncodeSettings

# Mid-range colours (BGR): nothing clips in limited-range YUV, so a round trip is near exact.
COLOURS = [(40, 60, 200), (200, 80, 40), (60, 190, 70), (128, 128, 128), (30, 200, 220), (210, 40, 180)]


@pytest.fixture(scope="session")
def x264() -> EncoderChoice:
    """The service's default libx264 settings."""
    return encoder_for("libx264", EncodeSettings())


def solid_frames(colours, width: int, height: int) -> np.ndarray:
    """One frame per colour, `[n, H, W, 3]` BGR."""
    return np.stack([np.full((height, width, 3), c, dtype=np.uint8) for c in colours])


def encode_frames(path: Path, frames: np.ndarray, fps, choice: EncoderChoice, ffmpeg: str) -> Path:
    with VideoEncoder(path, frames.shape[2], frames.shape[1], fps, choice, ffmpeg) as enc:
        enc.write(frames)
    return path


def decode_all(path: Path, ffmpeg: str, fps=None) -> np.ndarray:
    """Every frame `VideoReader` gives, read in uneven batches to exercise batch boundaries."""
    batches = []
    with VideoReader(path, probe_video(path), fps, ffmpeg) as reader:
        while (batch := reader.read(7)).shape[0]:
            batches.append(batch)
    assert reader.frames_read == sum(b.shape[0] for b in batches)
    return np.concatenate(batches) if batches else np.zeros((0,), np.uint8)


def lavfi_video(
    ffmpeg: str,
    path: Path,
    source: str,
    *,
    pix_fmt: str = "yuv420p",
    before: Sequence[str] = (),
    after: Sequence[str] = (),
) -> Path:
    """An H.264 file from an ffmpeg lavfi source (e.g. 'testsrc2=size=320x240:rate=25:duration=1')."""
    run_ffmpeg(
        ffmpeg, [*before, "-f", "lavfi", "-i", source, *after, "-c:v", "libx264", "-pix_fmt", pix_fmt, file_arg(path)]
    )
    return path


def pid_alive(pid: int) -> bool:
    """Whether `pid` still exists, zombie included (a zombie keeps its /proc entry)."""
    return Path(f"/proc/{pid}").exists()


@pytest.fixture
def readonly_dir(tmp_path) -> Path:
    """A directory this process can't write to: a 0555 folder, or under root (which ignores
    modes) a read-only system folder; skipped where neither exists."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not os.access(folder, os.W_OK):
            yield folder
            return
        for candidate in (Path("/proc/sys"), Path("/sys/fs/cgroup")):
            if candidate.is_dir() and not os.access(candidate, os.W_OK):
                yield candidate
                return
        pytest.skip("running as root with no read-only directory available")
    finally:
        folder.chmod(0o755)
