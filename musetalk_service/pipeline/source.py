"""Source frames for output frames: streamed once, or kept on disk when the output cycles.

Output frame i shows source frame `pingpong_index(i, n)`: the video plays forward, then backward,
and repeats (both ends shown twice, as in the official cycle `frames + frames[::-1]`). When the
audio is no longer than the video the frames stream straight from the decoder and are never held.
When the output must cycle, each decoded frame is also appended to a raw file on disk, so memory
stays flat however long the video is; reads go through the page cache, not our heap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from musetalk_service.media.decode import VideoReader
from musetalk_service.media.probe import VideoInfo
from musetalk_service.pipeline.batch import Batch
from musetalk_service.pipeline.frames import DeviceFrames, DeviceFrameUploader
from musetalk_service.pipeline.plan import RequestPlan
from musetalk_service.pipeline.timing import PhaseTimer


def pingpong_index(i: int, n: int) -> int:
    """Source index for output frame i of a video with n frames, cycling forward then backward."""
    j = i % (2 * n)
    return j if j < n else 2 * n - 1 - j


class FrameStore:
    """Append-only raw frames of one shape in one file; random reads with pread (no mmap: keeps RSS flat)."""

    def __init__(self, path: Path, frame_shape: tuple[int, ...]):
        self.path = path
        self.shape = frame_shape
        self.frame_bytes = int(np.prod(frame_shape))
        self.count = 0
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def append(self, frames: np.ndarray) -> None:
        if len(frames) == 0:  # the decoder's last read can be empty; memoryview can't cast a 0-size shape
            return
        data = memoryview(np.ascontiguousarray(frames)).cast("B")  # no copy
        offset = self.count * self.frame_bytes
        while data:  # a large write may be cut short
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written
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

    `frame_count` is the video's exact frame count at `fps` when it is known (from its prepared
    avatar); None when the video is being prepared in the same pass, in which case it becomes
    known when the decoder runs dry. Frames are kept on disk only when the output cycles: for an
    unknown count, when the output is clearly longer than the probe's estimate. Should a video
    whose estimate said otherwise turn out to need it, it is decoded again into the store, once.
    `pix_fmt`: the frames' form, as for `VideoReader` (BGR, or yuv420p planes as decoded).
    `output_frames` 0 (and `work_dir` None): no output, the frames are only read on (`remaining`).
    """

    # A container's duration can be a little off: only beyond this margin is a cycle certain.
    _ESTIMATE_MARGIN = 1.03

    def __init__(
        self,
        video_path: Path,
        info: VideoInfo,
        fps: Fraction,
        ffmpeg: str,
        work_dir: Path | None,
        output_frames: int,
        frame_count: int | None,
        pix_fmt: str = "bgr24",
    ):
        self.frame_count = frame_count
        self._open = lambda: VideoReader(video_path, info, fps, ffmpeg, pix_fmt)
        if frame_count is not None:
            cycles = output_frames > frame_count
        else:
            estimate = round(info.duration_s * fps) if info.duration_s else info.frame_count
            cycles = output_frames > 0 and (not estimate or output_frames > estimate * self._ESTIMATE_MARGIN)
        self._reader = self._open().__enter__()
        # No work dir: nothing is output (an avatar prepared ahead), so nothing is ever stored.
        self._store_path = work_dir / "frames.raw" if work_dir is not None else None
        self._store = FrameStore(self._store_path, self._reader.frame_shape) if cycles else None
        self._read = 0

    @property
    def needs_cycle(self) -> bool:
        """Whether source frames may be shown more than once (then blend masks are worth keeping)."""
        return self._store is not None

    def take(self, output_indices: list[int]) -> tuple[list[int], np.ndarray, int]:
        """Source indices, frames (`[b, *frame_shape]` of the reader's `pix_fmt`, private to the
        caller) and how many of them are fresh (decoded for the first time: the leading ones) for the next batch.

        Batches must come in order and contiguous. The first pass over the video streams from the
        decoder (each read is a new array); once the output runs past the video's end, frames come
        back from the store in ping-pong order, a fresh copy for every output frame. Raises
        IOError if the video has fewer frames than its known `frame_count`, or none at all.
        """
        end = output_indices[-1] + 1
        fresh = np.empty((0,), np.uint8)
        if self._read < end and (self.frame_count is None or self._read < self.frame_count):
            want = end - self._read if self.frame_count is None else min(end, self.frame_count) - self._read
            fresh = self._reader.read(want)
            self._read += len(fresh)
            if self._store is not None:
                self._store.append(fresh)
            if len(fresh) < want:
                if self.frame_count is not None:
                    raise IOError(f"the video gave {self._read} frames; its avatar has {self.frame_count}")
                self.frame_count = self._read
                if self.frame_count == 0:
                    raise IOError("the video has no decodable frames")
                if self._store is None and end > self.frame_count:
                    self._refill_store()
        n = self.frame_count
        sources = [i if n is None else pingpong_index(i, n) for i in output_indices]
        if len(fresh) == len(output_indices):
            return sources, fresh, len(fresh)
        rest = self._store.read(sources[len(fresh) :])
        frames = rest if not len(fresh) else np.concatenate([fresh, rest])
        return sources, frames, len(fresh)

    @property
    def decoded(self) -> int:
        """Source frames decoded so far in the first pass."""
        return self._read

    def read_on(self, n: int) -> np.ndarray:
        """The first pass's next `n` frames, past what the output asked for (for the avatar only:
        they are not stored for a cycle); fewer at the video's end, which makes `frame_count` known."""
        frames = self._reader.read(n)
        self._read += len(frames)
        if len(frames) < n:
            self.frame_count = self._read
        return frames

    def remaining(self, batch: int) -> Iterator[np.ndarray]:
        """The first pass's frames the output did not reach (the audio was shorter than the
        video), in batches of up to `batch`; afterwards `frame_count` is known."""
        while self.frame_count is None:
            frames = self.read_on(batch)
            if len(frames):
                yield frames

    def _refill_store(self) -> None:
        """The video ended sooner than its probe said and the output cycles: decode it again into a store."""
        reader = self._open().__enter__()
        try:
            self._store = FrameStore(self._store_path, reader.frame_shape)
            while len(batch := reader.read(32)):
                self._store.append(batch)
        finally:
            reader.__exit__(None, None, None)
        if self._store.count != self.frame_count:
            raise IOError(f"the video gave {self._store.count} frames on a second decode, {self.frame_count} on the first")

    def close(self) -> None:
        self._reader.__exit__(None, None, None)
        if self._store is not None:
            self._store.close()


class ReadStage:
    """Read phase (the decoder thread): the plan's batches as `Batch` records, in order.

    First the output's batches (`SourceFrames.take`); then, when the pass prepares the video's
    avatar, the frames the output did not reach, `plan.prep_batch` at a time (all of a video
    prepared ahead of time, whose plan has no output frames). Where the face phase and the masks
    read BGR and the video is decoded as its planes, each batch is made BGR on the device.
    """

    def __init__(self, plan: RequestPlan, source: SourceFrames, upload: DeviceFrameUploader | None, timer: PhaseTimer):
        self.plan = plan
        self.source = source
        self.upload = upload
        self.timer = timer

    def batches(self) -> Iterator[Batch]:
        plan = self.plan
        for start in range(0, plan.frames, plan.batch_size):
            with self.timer.phase("read"):
                batch = self._output_batch(list(range(start, min(start + plan.batch_size, plan.frames))))
            yield batch
        if not plan.prepares:
            return
        chunks = self.source.remaining(plan.prep_batch)
        while True:
            with self.timer.phase("read"):
                frames = next(chunks, None)
                if frames is None:
                    return
                batch = Batch([], [], frames[:0], np.zeros(0), None, self._bgr(frames))
            yield batch

    def _output_batch(self, indices: list[int]) -> Batch:
        sources, frames, fresh = self.source.take(indices)
        weights = self.plan.silence.weights[indices]
        ahead = self._ahead(indices)
        if not len(ahead):
            bgr = self._bgr(frames)
            prepare = bgr[:fresh] if self.plan.prepares and fresh and bgr is not None else None
            return Batch(indices, sources, frames, weights, bgr, prepare)
        # The video goes on past the output (so every frame of this batch is fresh): the face
        # phase sees the frames up to the next run boundary at once, as a preparation ahead would.
        both = self._bgr(np.concatenate([frames, ahead]))
        bgr = both[: len(frames)] if self.upload is not None else frames
        return Batch(indices, sources, frames, weights, bgr, both)

    def _ahead(self, indices: list[int]) -> np.ndarray:
        """A new video's frames after the output's last, up to the next `prep_batch` boundary
        (`plan.aligns_prep`); none otherwise."""
        source, plan = self.source, self.plan
        short = -source.decoded % plan.prep_batch
        if not plan.aligns_prep or indices[-1] + 1 < plan.frames or source.frame_count is not None or not short:
            return np.empty((0,), np.uint8)
        return source.read_on(short)

    def _bgr(self, frames: np.ndarray) -> np.ndarray | DeviceFrames | None:
        """What the face and parse phases read: BGR frames as decoded, a new video's planes made
        BGR on the device; a prepared avatar's planes need none (None)."""
        if self.plan.decode_pix_fmt == "bgr24":
            return frames
        return self.upload(frames) if self.upload is not None else None
