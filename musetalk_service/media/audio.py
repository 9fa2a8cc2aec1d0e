"""Speech as a float32 mono array, decoded by ffmpeg (any format it reads, video files included)."""

from __future__ import annotations

import logging
import os

import numpy as np

from musetalk_service.errors import BadAudio, FFmpegError
from musetalk_service.media.ffmpeg import FFmpegPipe, file_arg
from musetalk_service.media.probe import probe_audio

logger = logging.getLogger(__name__)


def load_audio(path: str | os.PathLike, ffmpeg: str, sample_rate: int = 16000) -> np.ndarray:
    """The first audio stream of `path`, downmixed to mono and resampled to `sample_rate`, as a
    float32 array in [-1, 1].

    Raises `InputFileNotFound`, and `BadAudio` naming the file when it has no audio stream, can't
    be decoded, or decodes to zero samples.
    """
    probe_audio(path)  # the clear error for a missing file, no audio stream or no samples
    args = ["-i", file_arg(path), "-map", "0:a:0", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "pipe:1"]
    try:
        with FFmpegPipe(ffmpeg, args, stdout=True, what=f"decoding audio {path}") as proc:
            raw = proc.read_all()
    except FFmpegError as exc:
        raise BadAudio(f"{path}: the audio can't be decoded: {exc.stderr_tail or exc.message}") from exc
    # A copy, so callers get a writable native-endian array rather than a view of read-only bytes.
    samples = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if samples.size == 0:
        raise BadAudio(f"{path}: the audio decodes to zero samples")
    logger.debug("%s: %d samples at %d Hz", path, samples.size, sample_rate)
    return samples
