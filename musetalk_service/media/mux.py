"""Put the speech track on the lip-synced video: one pass, video copied, never re-encoded.

`Mp4Audio` readies the track while the video is still being made; `mux_audio` joins the two.
"""

from __future__ import annotations

import glob
import logging
import os
import uuid
from pathlib import Path

from musetalk_service.media.ffmpeg import FFmpegPipe, ensure_writable_dir, file_arg, run_ffmpeg
from musetalk_service.media.probe import AudioInfo, probe_audio, probe_video

logger = logging.getLogger(__name__)

MP4_COPY_AUDIO_CODECS = frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus"})
"""Audio codecs copied into the MP4 as they are. This ffmpeg would also mux vorbis, flac and PCM
into MP4, but common players (browsers, QuickTime) don't play those from MP4, so they become AAC."""

_AAC_ARGS = ["-c:a", "aac", "-b:a", "192k"]


_PART = ".part"


def partial_outputs(output_path: str | os.PathLike) -> list[Path]:
    """The temporary files `mux_audio` has next to `output_path`: left there only by a process
    killed mid-mux (an engine replica that died), for whoever sees that disk to remove."""
    out = Path(output_path)
    return list(out.parent.glob(f".{glob.escape(out.name)}.*{_PART}"))


def mux_audio(
    video_path: str | os.PathLike, audio_path: str | os.PathLike, output_path: str | os.PathLike, ffmpeg: str
) -> None:
    """Write `output_path` (MP4): the first video stream of `video_path`, copied, and the first
    audio stream of `audio_path`, copied where MP4 players take its codec, else AAC 192k.

    No `-shortest`: the output lasts as long as the longer track, which is the audio when the
    video has floor(audio_s * fps) frames. The file is written under a hidden temporary name in
    the same directory and renamed into place, so `output_path` is either complete or untouched.

    Raises `OutputNotWritable` (checked before ffmpeg runs), `InputFileNotFound`, `NoVideoStream`,
    `NotAVideo`, `BadAudio`, `FFmpegError`.
    """
    out = ensure_writable_dir(output_path)
    probe_video(video_path)
    audio = probe_audio(audio_path)
    audio_args = ["-c:a", "copy"] if audio.codec in MP4_COPY_AUDIO_CODECS else _AAC_ARGS
    # A unique name, not mkstemp: mkstemp's 0600 mode would survive the rename.
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}{_PART}")
    args = [
        "-i", file_arg(video_path),
        "-i", file_arg(audio_path),
        "-map", "0:v:0", "-map", "1:a:0",
        "-c:v", "copy", *audio_args,
        "-movflags", "+faststart",
        "-f", "mp4", file_arg(tmp),
    ]  # fmt: skip
    try:
        run_ffmpeg(ffmpeg, args, what=f"muxing {audio_path} onto {video_path}")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("muxed %s (audio %s: %s)", out, audio.codec, "copied" if audio_args[-1] == "copy" else "AAC")


class Mp4Audio:
    """The speech track as the output MP4 will carry it, made while the video is.

    A codec MP4 players take (`MP4_COPY_AUDIO_CODECS`) is the request's file itself. Any other is
    encoded to AAC (as `mux_audio` would) into `work_dir` by an ffmpeg that starts when the block
    is entered and runs beside the video work, so `mux_audio` then only copies streams: on the
    H100 host, encoding 120 s of WAV inside the mux had added 1.9-2.6 s after the last frame.

    Use as a context manager; `path()` waits for the encoding and returns the file to mux (raising
    `FFmpegError` if it failed). Leaving the block stops an encoding still running.
    """

    def __init__(self, audio_path: str | os.PathLike, info: AudioInfo, work_dir: str | os.PathLike, ffmpeg: str):
        self._source = Path(audio_path)
        self._encoded: Path | None = None
        self._pipe: FFmpegPipe | None = None
        if info.codec not in MP4_COPY_AUDIO_CODECS:
            self._encoded = Path(work_dir) / "audio.m4a"
            args = ["-i", file_arg(audio_path), "-map", "0:a:0", "-vn", *_AAC_ARGS, "-f", "mp4", file_arg(self._encoded)]
            self._pipe = FFmpegPipe(ffmpeg, args, what=f"encoding {audio_path} to AAC")

    def __enter__(self) -> Mp4Audio:
        if self._pipe is not None:
            self._pipe.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._pipe is not None:
            self._pipe.kill()  # a no-op once `path()` has waited for it

    def path(self) -> Path:
        """The file whose audio stream the MP4 takes as it is."""
        if self._pipe is None:
            return self._source
        self._pipe.finish()
        return self._encoded
