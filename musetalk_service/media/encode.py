"""H.264 encoding: pick the encoder once, then stream raw frames into one ffmpeg per output.

Output is always yuv420p, BT.709 limited range and tagged as such: HD players assume BT.709, and
decoding a BT.709 source to BGR then encoding it back the same way keeps untouched pixels' colours.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from musetalk_service.errors import FFmpegError
from musetalk_service.media.ffmpeg import (
    FFmpegPipe,
    describe_returncode,
    ensure_writable_dir,
    file_arg,
    run_ffmpeg,
)
from musetalk_service.media.rates import exact_rate
from musetalk_service.media.rawvideo import PIX_FMTS, frame_bytes
from musetalk_service.settings import EncodeSettings

logger = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 60
# Big enough for any hardware encoder's minimum frame size, small enough to cost nothing.
_PROBE_SOURCE = "color=c=gray:s=256x256:r=25:d=0.2"

_OUTPUT_COLOUR = [
    "-pix_fmt", "yuv420p",
    "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv",
]  # fmt: skip


@dataclass(frozen=True)
class EncoderChoice:
    """An ffmpeg video encoder and its options (everything after `-c:v <name>`)."""

    name: str
    args: tuple[str, ...]

    def ffmpeg_args(self) -> list[str]:
        return ["-c:v", self.name, *self.args]


def encoder_for(name: str, settings: EncodeSettings) -> EncoderChoice:
    """The `EncoderChoice` for `name` ('h264_nvenc' or 'libx264') with the configured quality
    (libx264's preset by `settings.profile`: an intermediate file trades size for CPU)."""
    if name == "h264_nvenc":
        # -cq only governs quality in VBR mode with no bitrate cap; otherwise nvenc's 2 Mb/s
        # default target wins.
        return EncoderChoice(
            name, ("-preset", settings.nvenc_preset, "-rc", "vbr", "-cq", str(settings.nvenc_cq), "-b:v", "0")
        )
    if name == "libx264":
        preset = settings.intermediate_x264_preset if settings.profile == "intermediate" else settings.x264_preset
        return EncoderChoice(name, ("-preset", preset, "-crf", str(settings.x264_crf)))
    raise ValueError(f"unknown encoder {name!r}")


@functools.cache
def _open_failure(ffmpeg: str, choice: EncoderChoice) -> FFmpegError | None:
    """None when `choice` really encodes a tiny clip with this ffmpeg, else the failure.

    A compiled-in encoder proves nothing (h264_nvenc is in every static build, and H100/H200/A100
    have no NVENC hardware), so only opening it counts. Cached: the answer can't change while the
    process runs.
    """
    args = ["-f", "lavfi", "-i", _PROBE_SOURCE, *choice.ffmpeg_args(), "-pix_fmt", "yuv420p", "-f", "null", "-"]
    try:
        run_ffmpeg(ffmpeg, args, timeout=_PROBE_TIMEOUT_S, what=f"probing encoder {choice.name}")
    except FFmpegError as exc:
        return exc
    return None


def choose_encoder(settings: EncodeSettings, ffmpeg: str) -> EncoderChoice:
    """The encoder to use: `settings.encoder` if it opens, or for 'auto' h264_nvenc where it opens,
    else libx264. Raises `FFmpegError` when the explicitly configured encoder (or, for 'auto',
    neither) can be opened."""
    names = ["h264_nvenc", "libx264"] if settings.encoder == "auto" else [settings.encoder]
    reasons = []
    for name in names:
        choice = encoder_for(name, settings)
        failure = _open_failure(ffmpeg, choice)
        if failure is None:
            logger.info("video encoder: %s %s", name, " ".join(choice.args))
            return choice
        reason = f"{name}: {_first_line(failure)}"
        logger.info("encoder %s can't be used here (%s)", name, reason)
        reasons.append(reason)
    if settings.encoder == "auto":
        message = f"no H.264 encoder can be used with {ffmpeg}: {'; '.join(reasons)}"
    else:
        message = (
            f"encode.encoder={settings.encoder!r} can't be used with {ffmpeg} ({reasons[0]}); "
            "'auto' falls back to libx264"
        )
    raise FFmpegError(message, returncode=failure.returncode, stderr_tail=failure.stderr_tail)


def _first_line(failure: FFmpegError) -> str:
    """ffmpeg's first complaint names the cause; later lines are the fallout."""
    lines = failure.stderr_tail.splitlines()
    return f"{lines[0]} ({describe_returncode(failure.returncode)})" if lines else failure.message


def even_size(width: int, height: int) -> tuple[int, int]:
    """The size `VideoEncoder` writes: yuv420p needs even sides, so an odd one loses its last
    pixel column or row (cropped at the right/bottom, never scaled)."""
    return width - width % 2, height - height % 2


class VideoEncoder:
    """One ffmpeg encoding raw frames from stdin to an H.264 MP4 at `path` (video only).

    `input_pix_fmt` 'bgr24' takes `[b, H, W, 3]` (or `[H, W, 3]`) uint8 arrays; 'yuv420p' takes
    bytes-like data of whole frames, already BT.709 limited range (a GPU conversion path). The
    frame rate is exact (`-framerate 30000/1001`). Odd sizes are cropped to `even_size`.

    As a context manager: a normal exit waits for ffmpeg and checks its status; an exception (or
    an ffmpeg failure) kills and reaps ffmpeg and deletes the partial file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: Fraction,
        choice: EncoderChoice,
        ffmpeg: str,
        input_pix_fmt: str = "bgr24",
    ):
        if input_pix_fmt not in PIX_FMTS:
            raise ValueError(f"input_pix_fmt must be one of {PIX_FMTS}, not {input_pix_fmt!r}")
        if width < 2 or height < 2:
            raise ValueError(f"frame size {width}x{height} is too small to encode")
        self.path = ensure_writable_dir(path)
        self.width, self.height = width, height
        self.input_pix_fmt = input_pix_fmt
        self.output_size = even_size(width, height)
        self._frames_written = 0
        self._closed = False
        out_w, out_h = self.output_size
        filters = [f"crop={out_w}:{out_h}:0:0"] if (out_w, out_h) != (width, height) else []
        if input_pix_fmt != "yuv420p":
            # Recent ffmpeg derives the RGB->YUV matrix from the output tags (_OUTPUT_COLOUR);
            # older ones (a distro ffmpeg on PATH) only from the scale filter: say it in both.
            filters.append("scale=out_color_matrix=bt709:out_range=tv")
        args = [
            "-f", "rawvideo", "-pix_fmt", input_pix_fmt, "-video_size", f"{width}x{height}",
            "-framerate", str(exact_rate(fps)),
            # yuv420p input is already BT.709 limited range (the GPU path converts it): say so, or
            # ffmpeg assumes another matrix and converts it again to the output tags.
            *(["-colorspace", "bt709", "-color_range", "tv"] if input_pix_fmt == "yuv420p" else []),
            "-i", "pipe:0",
            *(["-vf", ",".join(filters)] if filters else []),
            "-an",
            *choice.ffmpeg_args(),
            *_OUTPUT_COLOUR,
            "-movflags", "+faststart",
            "-f", "mp4", file_arg(self.path),
        ]  # fmt: skip
        self._pipe = FFmpegPipe(ffmpeg, args, stdin=True, what=f"encoding {self.path} with {choice.name}")

    def __enter__(self) -> VideoEncoder:
        self._pipe.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._pipe.kill()
            self._discard()

    def close(self) -> None:
        """Flush: end ffmpeg's input, wait for it and check its status (the partial file is
        deleted if it failed). Idempotent; the context manager's normal exit calls it."""
        if self._closed:
            return
        self._closed = True
        try:
            self._pipe.finish()
        except BaseException:
            self._discard()
            raise

    @property
    def frames_written(self) -> int:
        """Frames handed to ffmpeg so far."""
        return self._frames_written

    @property
    def pid(self) -> int:
        """The ffmpeg process id (for monitoring)."""
        return self._pipe.pid

    def write(self, frames) -> None:
        """Send frames: a uint8 array `[b, H, W, 3]` / `[H, W, 3]` for bgr24 input, or bytes-like
        data holding whole frames. Raises `FFmpegError` (with ffmpeg's stderr) if ffmpeg died."""
        data, count = frame_data(frames, self.input_pix_fmt, self.width, self.height)
        self._pipe.write(data)
        self._frames_written += count

    def _discard(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove partial output %s: %s", self.path, exc)


def frame_data(frames, input_pix_fmt: str, width: int, height: int) -> tuple[np.ndarray | memoryview, int]:
    """`frames` checked and flattened to what ffmpeg reads: `(data, count)`, where `data` is a
    one-dimensional byte buffer (a uint8 array or a memoryview) of `count` whole frames.

    bgr24 takes a uint8 array `[b, H, W, 3]` / `[H, W, 3]` or bytes-like data; yuv420p takes
    bytes-like data (or an array of its bytes). Raises `ValueError` for anything else.
    """
    if isinstance(frames, np.ndarray) and input_pix_fmt == "bgr24":
        batch = frames[None] if frames.ndim == 3 else frames
        if batch.dtype != np.uint8 or batch.shape[1:] != (height, width, 3):
            raise ValueError(f"expected uint8 frames [b, {height}, {width}, 3], got {batch.dtype} {list(frames.shape)}")
        return np.ascontiguousarray(batch).reshape(-1), batch.shape[0]
    size = frame_bytes(input_pix_fmt, width, height)
    data = memoryview(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames).cast("B")
    count, leftover = divmod(data.nbytes, size)
    if leftover:
        raise ValueError(f"{data.nbytes} bytes is not a whole number of {size}-byte frames")
    return data, count

