"""Source frames for output frames: streamed once, or kept on disk when the output cycles.

Output frame i shows source frame `pingpong_index(i, n)`: the video plays forward, then backward,
and repeats (both ends shown twice, as in the official cycle `frames + frames[::-1]`). When the
audio is no longer than the video the frames stream straight from the decoder and are never held.
When the output must cycle, each decoded frame is also appended to a raw file on disk, so memory
stays flat however long the video is; reads go through the page cache, not our heap.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from musetalk_service.media.decode import VideoReader
from musetalk_service.media.probe import VideoInfo


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

    `frame_count` is the video's exact frame count at `fps` (known from its prepared avatar), so
    whether the output cycles is known before the first frame: only then are frames kept on disk.
    """

    def __init__(self, video_path: Path, info: VideoInfo, fps: Fraction, ffmpeg: str, work_dir: Path, output_frames: int, frame_count: int):
        self.frame_count = frame_count
        self.needs_cycle = output_frames > frame_count
        self._reader = VideoReader(video_path, info, fps, ffmpeg).__enter__()
        self._store = FrameStore(work_dir / "frames.raw", info.height, info.width) if self.needs_cycle else None

    def take(self, output_indices: list[int]) -> tuple[list[int], np.ndarray]:
        """Source indices and frames ([b,H,W,3] BGR, private to the caller) for the next batch.

        Batches must come in order and contiguous. The first pass over the video streams from the
        decoder (each read is a new array); once the output runs past the video's end, frames come
        back from the store in ping-pong order, a fresh copy for every output frame.
        """
        sources = [pingpong_index(i, self.frame_count) for i in output_indices]
        fresh_end = min(output_indices[-1] + 1, self.frame_count)
        fresh_start = min(output_indices[0], self.frame_count)
        if fresh_end > fresh_start:
            fresh = self._reader.read(fresh_end - fresh_start)
            if len(fresh) != fresh_end - fresh_start:
                raise IOError(f"the video gave {fresh_start + len(fresh)} frames; its avatar has {self.frame_count}")
            if self._store is not None:
                self._store.append(fresh)
            if fresh_end - fresh_start == len(output_indices):
                return sources, fresh
        assert self._store is not None
        return sources, self._store.read(sources)

    def close(self) -> None:
        self._reader.__exit__(None, None, None)
        if self._store is not None:
            self._store.close()
