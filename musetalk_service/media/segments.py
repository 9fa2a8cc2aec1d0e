"""Parallel H.264 encoding: consecutive segments encoded at once by several ffmpeg processes, then
joined into one MP4 without re-encoding.

Why: the H100, H200 and A100 have no NVENC, and one libx264 fed from a pipe tops out at 1080p near
165 fps from bgr24, 295 fps from yuv420p (veryfast), below what the GPU stages produce. Encoders
in parallel on the 16-core host reach 311 / 390 fps from bgr24 and 377 / 409 fps from yuv420p
(2 / 4 encoders; /work/shared/docs/field-notes.md, section 2). Past that the host's cores are the
limit: on the benchmark's 1080p talking head one veryfast encoder made 198 fps on 11.5 of the 16
cores and four together 232 fps on 13.8; one superfast (the default preset) made 295 fps alone
(docs/benchmarks.md, session 6).

How: the frames are cut into consecutive segments of `segment_frames`. Each segment is its own
`VideoEncoder` (its own ffmpeg, so it starts with an IDR frame) writing an intermediate MP4, fed
by its own thread from a queue, so `write` only copies the frames and returns while up to
`workers` encoders work. `close` joins the segments with ffmpeg's concat demuxer and `-c copy`.

Why the joins are exact:
- B-frames stay on (`-bf 0` made a 1080p talking head 82% bigger at the same crf). A segment is
  a whole encode, so no frame refers across a join. With B-frames a segment's dts run one or two
  frames behind its pts (an MP4 edit list), and the concat demuxer shifts pts and dts alike, so
  the joined dts stay one frame apart as long as every segment has the same delay. x264 only
  reaches its delay from the third frame of an encode, so a short last segment would leave a dts
  gap (an uneven stts, a wrong average frame rate): the last segment never has fewer than
  `MIN_SEGMENT_FRAMES` frames; a shorter remainder is appended to the one before.
- The concat demuxer places each file at the sum of the earlier files' durations in whole
  microseconds. A 30000/1001 fps frame lasts 33366.67 us, so that rounding drifts by a timescale
  tick after ~50 segments (a 1001/1002 stts). The list states each file's duration as the
  difference of its exact end and start times rounded to microseconds, so nothing accumulates.
- The joined file is checked before it replaces `path`: exactly the frames written, frame k at
  pts k/fps, dts one frame apart.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from musetalk_service.errors import FFmpegError
from musetalk_service.media.encode import EncoderChoice, VideoEncoder, even_size, frame_data
from musetalk_service.media.ffmpeg import ensure_writable_dir, file_arg, run_ffmpeg
from musetalk_service.media.rates import exact_rate

logger = logging.getLogger(__name__)

MAX_ENCODE_WORKERS = 4
"""Beyond 4 parallel encoders the 16-core host gains little (field notes: 377 -> 409 fps from
yuv420p going from 2 to 4); more processes only add memory and segment joins."""

_PIXELS_PER_WORKER = {"bgr24": 960 * 540, "yuv420p": 1920 * 1080}
"""Frame pixels per encoder, by the pipe's pixel format. From bgr24 ffmpeg converts every frame to
yuv420p itself, and one process tops out near 194 fps at 1080p: one per quarter of 1080p (1080p
gets 4, 720p 2). From yuv420p one encoder does 295 fps alone, and in a 1080p request on the H100
(2026-11-24, 60 s, warm, twice each) one made 143.6 / 153.1 fps against 142.1 / 151.7 with 4, its
request adding 0.3 GB of resident memory instead of 1.3-1.8 GB (4 segments queue up to 1016
frames): one per 1080p frame (1440p gets 2, 4K 4)."""

_CORES_PER_WORKER = 2
"""Each libx264 process needs its share of cores (bgr24->yuv420p conversion plus x264 threads):
on 8 cores 4 encoders, on the 2-core development machine a single one."""

MIN_SEGMENT_FRAMES = 16
"""The shortest segment: well past an H.264 encoder's reordering delay (x264's is 2 frames, which
an encode reaches at its third frame), so every segment has the same dts offset."""

_END = object()
"""Queue item: the segment is complete; close its encoder normally."""

_ABORT = object()
"""Queue item: the segment is being abandoned; leave its encoder the failure way."""


def encode_workers_for(width: int, height: int, cpu_count: int | None, pix_fmt: str = "bgr24") -> int:
    """How many ffmpeg encoders to run in parallel for `width`x`height` frames piped as `pix_fmt`
    on `cpu_count` cores (`os.cpu_count()`; None counts as 1).

    One per `_PIXELS_PER_WORKER` (by the pipe's format), at most one per 2 cores and at most 4
    (field notes, 16 cores, veryfast: 194 / 311 / 390 fps from bgr24 with 1 / 2 / 4 encoders,
    295 / 377 / 409 fps from yuv420p). Where one encoder keeps up, segments would only add
    joins and frames queued in memory.
    """
    if pix_fmt not in _PIXELS_PER_WORKER:
        raise ValueError(f"pix_fmt must be one of {sorted(_PIXELS_PER_WORKER)}, got {pix_fmt!r}")
    by_size = math.ceil(width * height / _PIXELS_PER_WORKER[pix_fmt])
    by_cores = (cpu_count or 1) // _CORES_PER_WORKER
    return max(1, min(MAX_ENCODE_WORKERS, by_size, by_cores))


class SegmentedEncoder:
    """Encodes raw frames to an H.264 MP4 at `path` with up to `workers` ffmpeg processes at once.

    The interface is `VideoEncoder`'s (same frames, `input_pix_fmt`, odd-size crop, exact `fps`):
    a context manager, `write(frames)` in order, `close()`, `frames_written`, `output_size`.
    With `workers=1` it is a single `VideoEncoder` writing `path` directly. Otherwise:

    - Segments have `segment_frames` frames (at least `MIN_SEGMENT_FRAMES`), except the last,
      which takes a remainder shorter than `MIN_SEGMENT_FRAMES` (up to `segment_frames + 15`).
    - `write` checks and copies the frames (the caller may reuse its buffer once it returns, as
      with `VideoEncoder`) and queues them for the segment's writer thread. At most `workers`
      segments are in progress; starting another waits for one to finish, so at most
      `workers * segment_frames + MIN_SEGMENT_FRAMES` frames are held in memory.
    - Segment files and the concat list live in a private folder under `tmp_dir` (default: the
      output's folder). `close` joins them into a hidden file beside `path`, checks its frame
      count and timestamps, renames it to `path` and deletes the folder.
    - Any failure (an ffmpeg dying, the join, an exception in the `with` block) kills every
      ffmpeg, reaps them and deletes all segment, temporary and partial files; an ffmpeg failure
      is raised as `FFmpegError` naming the segment and its frames.

    Choosing `segment_frames`: each segment starts with an IDR frame (on a 1080p talking head one
    IDR weighs about as much as 10 other frames: segments of 50 / 25 frames made it 16% / 34%
    bigger than one encode of 120), and the join probes each file by decoding its first frame
    (about 25 ms at 1080p). Longer segments cost memory instead: a 1080p frame is 6.2 MB as bgr24,
    3.1 MB as yuv420p. 250 frames, x264's default keyframe interval, adds no IDR frames at all.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: Fraction,
        choice: EncoderChoice,
        ffmpeg: str,
        *,
        workers: int,
        segment_frames: int,
        input_pix_fmt: str = "bgr24",
        tmp_dir: str | os.PathLike | None = None,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if segment_frames < MIN_SEGMENT_FRAMES:
            raise ValueError(f"segment_frames must be >= {MIN_SEGMENT_FRAMES}, got {segment_frames}")
        self.path = ensure_writable_dir(path)
        self.output_size = even_size(width, height)
        self.input_pix_fmt = input_pix_fmt
        self.width, self.height = width, height
        self._fps = exact_rate(fps)
        self._ffmpeg = ffmpeg
        self._workers = workers
        self._segment_frames = segment_frames
        self._new_encoder = functools.partial(
            VideoEncoder, width=width, height=height, fps=fps, choice=choice, ffmpeg=ffmpeg, input_pix_fmt=input_pix_fmt
        )
        self._direct: VideoEncoder | None = None
        self._tmp_parent = Path(tmp_dir) if tmp_dir is not None else self.path.parent
        if workers == 1:
            self._direct = self._new_encoder(self.path)
        else:
            # Built and dropped (nothing starts) so that bad arguments and an unwritable tmp_dir
            # fail here, as with VideoEncoder, rather than at the first frame.
            self._new_encoder(self._tmp_parent / "segment.mp4")
        self._dir: Path | None = None
        self._segments: list[_Segment] = []
        self._current: _Segment | None = None
        self._held: list[np.ndarray] = []
        self._pool: _FramePool | None = None
        self._frames_written = 0
        self._closed = False
        self._finished = threading.Condition()

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> SegmentedEncoder:
        if self._direct is not None:
            self._direct.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._direct is not None:
            self._direct.__exit__(exc_type, exc, tb)
        elif exc_type is None:
            self.close()
        else:
            self._abort()

    def close(self) -> None:
        """Finish every segment, join them into `path` and check the result; on failure clean up
        everything and raise. Idempotent; the context manager's normal exit calls it."""
        if self._direct is not None:
            self._direct.close()
            return
        if self._closed:
            return
        self._closed = True
        try:
            if self._current is None:
                # No frames: the concat demuxer can't join an empty file, so write the same empty
                # MP4 a VideoEncoder would.
                with self._new_encoder(self.path):
                    pass
                return
            for frame in self._held:
                self._current.put(frame)
            self._held.clear()
            self._current.end()
            self._current = None
            for segment in self._segments:
                segment.join()
            self._raise_if_failed()
            self._join_segments()
            self._pool.clear()
        except BaseException:
            self._abort()
            raise

    # -- I/O -------------------------------------------------------------------------------

    def write(self, frames) -> None:
        """Queue frames (as `VideoEncoder.write` takes them); blocks while `workers` segments are
        in progress and a new one must start. Raises `FFmpegError` once a segment has failed,
        after cleaning up, and `ValueError` for malformed frames (nothing is queued then)."""
        if self._direct is not None:
            self._direct.write(frames)
            return
        if self._closed:
            raise RuntimeError(f"{self.path}: write after close")
        data, count = frame_data(frames, self.input_pix_fmt, self.width, self.height)
        self._raise_if_failed()
        if count == 0:
            return
        frame_bytes = data.nbytes // count
        if self._pool is None:
            self._pool = _FramePool(frame_bytes)
        flat = np.frombuffer(data, np.uint8)
        for k in range(count):
            self._queue(self._pool.copy(flat[k * frame_bytes : (k + 1) * frame_bytes]))
            self._frames_written += 1

    # -- state -----------------------------------------------------------------------------

    @property
    def frames_written(self) -> int:
        """Frames accepted so far (handed to ffmpeg or queued for it)."""
        if self._direct is not None:
            return self._direct.frames_written
        return self._frames_written

    @property
    def pids(self) -> list[int]:
        """The ffmpeg processes encoding now (for monitoring)."""
        if self._direct is not None:
            return [self._direct.pid]
        return [segment.encoder.pid for segment in self._segments if not segment.finished]

    # -- internals -------------------------------------------------------------------------

    def _queue(self, frame: np.ndarray) -> None:
        """Give the next frame to the segment in progress, starting segments as needed."""
        if self._current is None:
            self._current = self._start_segment(first_frame=0)
        segment = self._current
        if segment.frames < self._segment_frames:
            segment.put(frame)
            return
        # The segment is full. Hold the next frames back until there are enough for a segment of
        # their own: if the stream ends before that, they belong at this segment's end (see the
        # module docstring).
        self._held.append(frame)
        if len(self._held) == MIN_SEGMENT_FRAMES:
            segment.end()
            self._current = self._start_segment(first_frame=segment.first_frame + segment.frames)
            for held in self._held:
                self._current.put(held)
            self._held.clear()

    def _start_segment(self, first_frame: int) -> _Segment:
        """Wait for a free worker, then start the next segment's encoder and writer thread."""
        with self._finished:
            self._finished.wait_for(
                lambda: sum(not s.finished for s in self._segments) < self._workers
                or any(s.error is not None for s in self._segments)
            )
        self._raise_if_failed()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="segments-", dir=self._tmp_parent))
        index = len(self._segments)
        encoder = self._new_encoder(self._dir / f"{index:05d}.mp4")
        with contextlib.ExitStack() as stack:
            # Started here rather than in the writer thread, so that its pid exists for
            # `_Segment.abandon` from the start; the thread then owns it (and its exit).
            stack.enter_context(encoder)
            segment = _Segment(index, first_frame, encoder, stack.pop_all(), self._pool, self._segment_finished)
        segment.start()
        self._segments.append(segment)
        logger.debug("%s: segment %d starts at frame %d", self.path, index, segment.first_frame)
        return segment

    def _segment_finished(self) -> None:
        with self._finished:
            self._finished.notify_all()

    def _raise_if_failed(self) -> None:
        """If a segment has failed: abort everything, then raise its error (the first found)."""
        failed = next((s for s in self._segments if s.error is not None), None)
        if failed is None:
            return
        self._abort()
        error = failed.error
        if not isinstance(error, FFmpegError):
            raise error
        raise FFmpegError(
            f"segment {failed.index} (frames {failed.first_frame}-{failed.first_frame + failed.frames - 1}) "
            f"of {self.path}: {error.message}",
            returncode=error.returncode,
            stderr_tail=error.stderr_tail,
        ) from error

    def _abort(self) -> None:
        """Kill every ffmpeg, wait until each writer thread has reaped its own and deleted its
        file, then delete the segment folder. Never raises; idempotent."""
        self._closed = True
        self._current = None
        self._held.clear()
        for segment in self._segments:
            segment.abandon()
        for segment in self._segments:
            segment.join()
        if self._pool is not None:
            self._pool.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _join_segments(self) -> None:
        """Concatenate the segment files into `path` (stream copy), check it, clean up."""
        listing = self._dir / "segments.txt"
        entries = []
        for segment in self._segments:
            start = _microseconds(segment.first_frame, self._fps)
            end = _microseconds(segment.first_frame + segment.frames, self._fps)
            seconds, micros = divmod(end - start, 1_000_000)
            entries.append(f"file {_quoted(file_arg(segment.path))}\nduration {seconds}.{micros:06d}\n")
        listing.write_text("".join(entries))
        part = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.part")
        args = [
            # -safe 0: the entries are absolute file: URLs, which the concat demuxer's safe mode
            # refuses. Relative names would resolve against the list's URL, where '?' or '#' in
            # a folder name breaks them.
            "-f", "concat", "-safe", "0", "-i", file_arg(listing),
            "-c", "copy",
            "-movflags", "+faststart",
            "-f", "mp4", file_arg(part),
        ]  # fmt: skip
        try:
            run_ffmpeg(self._ffmpeg, args, what=f"joining {len(self._segments)} segments into {self.path}")
            _check_timing(part, self._frames_written, self._fps, what=f"joining segments into {self.path}")
            os.replace(part, self.path)
        finally:
            part.unlink(missing_ok=True)
        shutil.rmtree(self._dir, ignore_errors=True)
        logger.debug("%s: %d frames joined from %d segments", self.path, self._frames_written, len(self._segments))


class _Abandoned(Exception):
    """Raised in a writer thread to leave its encoder the failure way (kill, delete the file)."""


class _Segment:
    """One segment: its started encoder, the frames queued for it and the thread writing them."""

    def __init__(
        self,
        index: int,
        first_frame: int,
        encoder: VideoEncoder,
        owner: contextlib.ExitStack,
        pool: _FramePool,
        on_finished: Callable[[], None],
    ):
        self.index = index
        self.first_frame = first_frame
        self.frames = 0
        """Frames queued so far (only the caller's thread changes it)."""
        self.encoder = encoder
        self.error: BaseException | None = None
        self.finished = False
        self._owner = owner
        self._pool = pool
        self._on_finished = on_finished
        # Unbounded, but never holds more than segment_frames frames: the caller ends a segment
        # there, and the number of live segments is what bounds memory.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._exiting = False
        self._thread = threading.Thread(target=self._feed, name=f"encode-segment-{index}", daemon=True)

    @property
    def path(self) -> Path:
        return self.encoder.path

    def start(self) -> None:
        try:
            self._thread.start()
        except BaseException:
            # No thread will own the encoder: kill it and delete its file here.
            self._owner.__exit__(*sys.exc_info())
            raise

    def put(self, frame: np.ndarray) -> None:
        self._queue.put(frame)
        self.frames += 1

    def end(self) -> None:
        self._queue.put(_END)

    def abandon(self) -> None:
        """Make the writer thread stop: kill its ffmpeg so a blocked write fails now, and queue
        `_ABORT` for a thread waiting on the queue."""
        self._queue.put(_ABORT)
        with self._lock:
            # Once the thread is exiting it reaps ffmpeg itself, and a reaped pid may be reused.
            if not self._exiting:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.encoder.pid, signal.SIGKILL)

    def join(self) -> None:
        self._thread.join()

    def _feed(self) -> None:
        try:
            # Leaving the stack closes the encoder (ffmpeg's status checked) or, on an exception,
            # kills and reaps ffmpeg and deletes the segment file.
            with self._owner:
                try:
                    while (frame := self._queue.get()) is not _END:
                        if frame is _ABORT:
                            raise _Abandoned
                        # As a memoryview: VideoEncoder reads a bgr24 array as [b, H, W, 3].
                        self.encoder.write(memoryview(frame))
                        self._pool.give_back(frame)
                finally:
                    with self._lock:
                        self._exiting = True
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished = True
            self._on_finished()


class _FramePool:
    """Frame buffers for the queues, reused once ffmpeg has read them: a fresh 1080p buffer costs
    more than the copy into it (the kernel zeroes every new page: about 3 ms a frame here, against
    0.5 ms for the copy). It grows to the most frames ever queued at once, which the encoder
    bounds (`workers * segment_frames + MIN_SEGMENT_FRAMES`)."""

    def __init__(self, frame_bytes: int):
        self._frame_bytes = frame_bytes
        self._free: queue.SimpleQueue = queue.SimpleQueue()

    def copy(self, frame: np.ndarray) -> np.ndarray:
        """A pooled buffer holding a copy of `frame` (its bytes)."""
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            buffer = np.empty(self._frame_bytes, np.uint8)
        np.copyto(buffer, frame)
        return buffer

    def give_back(self, buffer: np.ndarray) -> None:
        self._free.put(buffer)

    def clear(self) -> None:
        """Free the buffers (once no thread uses the pool any more)."""
        self._free = queue.SimpleQueue()


def _microseconds(frame: int, fps: Fraction) -> int:
    """Where frame `frame` starts, in whole microseconds (the concat demuxer's unit)."""
    return round(Fraction(frame) / fps * 1_000_000)


def _quoted(text: str) -> str:
    """`text` as one token of an ffmpeg concat list: single-quoted, a quote written as '\\''."""
    return "'" + text.replace("'", "'\\''") + "'"


def _check_timing(path: Path, frames: int, fps: Fraction, *, what: str) -> None:
    """Raise `FFmpegError` unless `path`'s video has exactly `frames` frames, frame k at pts k/fps
    and the dts one frame apart (to the nearest tick): nothing dropped, doubled, shifted or
    stretched at a join."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [(packet.pts, packet.dts) for packet in container.demux(stream) if packet.size]
        time_base = stream.time_base
    if len(packets) != frames:
        raise FFmpegError(f"{what} gave {len(packets)} frames instead of {frames}")
    tick = 1 / (fps * time_base)
    first_dts = packets[0][1]
    for name, times, start in (("pts", sorted(p for p, _ in packets), 0), ("dts", [d for _, d in packets], first_dts)):
        for k, t in enumerate(times):
            if abs(t - start - k * tick) > Fraction(1, 2):
                raise FFmpegError(
                    f"{what} misplaced frame {k}: {name} {t}, expected {start + k * tick} (time base {time_base})"
                )
