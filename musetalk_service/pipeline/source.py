"""Source frames for output frames: streamed once, or kept on disk when the output cycles.

Output frame i shows source frame `pingpong_index(i, n)`: the video plays forward, then backward,
and repeats (both ends shown twice, as in the official cycle `frames + frames[::-1]`). When the
audio is shorter than the video the frames stream straight from the decoder and are never held.
When the output must cycle, each decoded frame is also appended to a raw file on disk, so memory
stays flat however long the video is; reads go through the page cache, not our heap.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import logging

import numpy as np

from musetalk_service.errors import NoVideoStream
from musetalk_service.media.decode import VideoReader
from musetalk_service.media.probe import VideoInfo

log = logging.getLogger(__name__)


def pingpong_index(i: int, n: int) -> int:
    """Source index for output frame i of a video with n frames, cycling forward then backward."""
    j = i % (2 * n)
    return j if j < n else 2 * n - 1 - j


class FrameStore:
    """Append-only raw BGR frames in one file; random reads with pread (no mmap: keeps RSS flat)."""

    def __init__(self, path: Path, height: int, width: int):
        self.path = path
        self.shape = (height, width, 3)
        self.frame_bytes = height * width * 3
        self.count = 0
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def append(self, frames: np.ndarray) -> None:
        data = np.ascontiguousarray(frames).tobytes()
        os.pwrite(self._fd, data, self.count * self.frame_bytes)
        self.count += len(frames)

    def read(self, indices: list[int]) -> np.ndarray:
        out = np.empty((len(indices), *self.shape), np.uint8)
        for k, j in enumerate(indices):
            view = memoryview(out[k]).cast("B")
            if os.preadv(self._fd, [view], j * self.frame_bytes) != self.frame_bytes:
                raise IOError(f"frame store {self.path} is short at frame {j}")
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


class SourceFrames:
    """Hands out source frames for batches of output frame indices, in output order.

    `needs_cycle` says whether output frames can outrun the video (decided from the probe's frame
    count with slack; if the decoder still runs dry early, the frames seen so far are already in the
    store or the video is decoded once more into it).
    """

    def __init__(self, video_path: Path, info: VideoInfo, fps: Fraction, ffmpeg: str, work_dir: Path, output_frames: int):
        self._video_path = video_path
        self._info = info
        self._fps = fps
        self._ffmpeg = ffmpeg
        self._work_dir = work_dir
        resampled = fps != info.fps
        expected = int(info.duration_s * fps) if resampled and info.duration_s else info.frame_count
        # If the probe over-promises and the decoder runs dry early anyway, `take` decodes the
        # video once more into a store (logged): rare, and correct either way.
        self.needs_cycle = output_frames > expected
        self._reader = VideoReader(video_path, info, fps, ffmpeg).__enter__()
        self._store: FrameStore | None = None
        if self.needs_cycle:
            self._store = FrameStore(work_dir / "frames.raw", info.height, info.width)
        self.decoded = 0
        self.total: int | None = None
        """Source frame count once the decoder has run dry; None before."""

    def take(self, output_indices: list[int]) -> tuple[list[int], np.ndarray]:
        """Source indices and frames ([b,H,W,3] BGR) for the next batch of output indices.

        Batches must come in order and contiguous. Frames fresh from the decoder are the reader's
        own buffer: the caller finishes with them (blend, encode) before asking for the next batch.
        """
        if self.total is None:
            start, need = self.decoded, output_indices[-1] + 1
            assert output_indices[0] == start, "batches must be contiguous and in order"
            fresh = self._reader.read(need - start)
            self.decoded += len(fresh)
            if self._store is not None:
                self._store.append(fresh)
            if len(fresh) < need - start:
                self.total = self.decoded
            else:
                return list(output_indices), fresh
        if self.total == 0:
            raise NoVideoStream(f"{self._video_path}: the video stream has no decodable frames")
        if self._store is None:
            self._fill_store_from_scratch()
        assert self._store is not None
        sources = [pingpong_index(i, self.total) for i in output_indices]
        return sources, self._store.read(sources)

    def _fill_store_from_scratch(self) -> None:
        """The probe over-promised: decode the whole video again into a store (rare path)."""
        log.warning("%s: %d frames, fewer than probed; decoding it again to cycle", self._video_path, self.decoded)
        self._store = FrameStore(self._work_dir / "frames.raw", self._info.height, self._info.width)
        with VideoReader(self._video_path, self._info, self._fps, self._ffmpeg) as reader:
            while len(batch := reader.read(64)):
                self._store.append(batch)
        self.total = self._store.count

    def close(self) -> None:
        self._reader.__exit__(None, None, None)
        if self._store is not None:
            self._store.close()
