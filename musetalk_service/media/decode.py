"""Video frames out of ffmpeg as numpy batches (BGR, or the yuv420p planes as decoded), at a constant frame rate."""

from __future__ import annotations

import logging
import os
from fractions import Fraction

import numpy as np

from musetalk_service.media.ffmpeg import FFmpegPipe, file_arg, find_ffmpeg
from musetalk_service.media.rates import exact_rate
from musetalk_service.media.probe import VideoInfo
from musetalk_service.media.rawvideo import frame_bytes

logger = logging.getLogger(__name__)


class VideoReader:
    """Decode the video stream of `path` to `uint8` BGR frames `[H, W, 3]`, display-oriented.

    With `pix_fmt='yuv420p'` a frame is instead its raw yuv420p bytes `[yuv420p_frame_bytes(W, H)]`:
    for a stream where `info.is_bt709_yuv420p`, the decoder's own planes with no conversion at all
    (half the bytes of BGR and about twice the frames per second out of one ffmpeg).

    Frames come out at exactly `fps` (default `info.fps`): ffmpeg's `fps` filter duplicates or
    drops frames by timestamp, so variable-frame-rate input becomes constant-rate and a rate
    conversion (e.g. 30 -> 25) keeps A/V timing. ffmpeg's autorotate turns rotated phone video
    upright, so frames are `info.height x info.width`. Any pixel format (10-bit, 4:4:4) and any
    size, odd included, is converted by ffmpeg.

    An untagged stream is converted as BT.709 (as HD players show it, and as the encoder tags its
    output), not as swscale's BT.601 default: then BGR frames and passed-through yuv420p planes of
    the same video agree, and untouched pixels come out with the colours they went in with.

    Use as a context manager; `read(n)` returns batches. Leaving early kills ffmpeg. `ffmpeg`
    defaults to `find_ffmpeg()`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        info: VideoInfo,
        fps: Fraction | None = None,
        ffmpeg: str | None = None,
        pix_fmt: str = "bgr24",
    ):
        self.path = path
        self.fps = exact_rate(fps) if fps is not None else info.fps
        self.width = info.width
        self.height = info.height
        self.pix_fmt = pix_fmt
        self._frame_bytes = frame_bytes(pix_fmt, info.width, info.height)
        self.frame_shape: tuple[int, ...] = (info.height, info.width, 3) if pix_fmt == "bgr24" else (self._frame_bytes,)
        """The shape of one frame as `read` returns it."""
        matrix = ":in_color_matrix=bt709" if info.colorspace == "unspecified" and pix_fmt == "bgr24" else ""
        self._frames_read = 0
        self._eof = False
        self._pipe = FFmpegPipe(
            ffmpeg or find_ffmpeg(),
            [
                "-i", file_arg(path),
                "-map", f"0:{info.stream_index}",
                # scale is a no-op at the probed size; it's there for streams that change
                # resolution midway, which would otherwise shear every later raw frame.
                "-vf", f"fps={self.fps},scale={info.width}:{info.height}{matrix}",
                # The fps filter already made the timing constant; don't let the muxer redo it.
                "-fps_mode", "passthrough",
                "-f", "rawvideo", "-pix_fmt", pix_fmt,
                "pipe:1",
            ],
            stdout=True,
            what=f"decoding {path}",
        )  # fmt: skip

    def __enter__(self) -> VideoReader:
        self._pipe.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._eof:
            self._pipe.finish()
        else:
            self._pipe.kill()

    @property
    def frames_read(self) -> int:
        """Frames returned by `read` so far."""
        return self._frames_read

    def read(self, n: int) -> np.ndarray:
        """Up to `n` frames as a new array `[b, *frame_shape]`: b < n only at the end, b == 0 after it.

        At the end ffmpeg's exit status is checked, so a decode failure raises `FFmpegError` here.
        """
        if n < 1:
            raise ValueError(f"read(n) needs n >= 1, got {n}")
        batch = np.empty((n, *self.frame_shape), dtype=np.uint8)
        if self._eof:
            return batch[:0]
        got = self._pipe.readinto(batch)
        frames, leftover = divmod(got, self._frame_bytes)
        if got < batch.nbytes:
            self._eof = True
            self._pipe.finish()
            if leftover:
                logger.warning(
                    "%s: ignoring a truncated last frame (%d of %d bytes)", self.path, leftover, self._frame_bytes
                )
        self._frames_read += frames
        return batch[:frames]
