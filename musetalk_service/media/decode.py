"""Video frames out of ffmpeg as BGR numpy batches, at a constant frame rate."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
from fractions import Fraction

import numpy as np

from musetalk_service.errors import FFmpegError
from musetalk_service.media.ffmpeg import FFmpegPipe, exact_rate, file_arg, find_ffmpeg
from musetalk_service.media.probe import VideoInfo

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_FRAMES = 32
"""Frames per chunk when several decoders share a stream (decoder k emits chunks k, k+K, ...)."""

_AUTO_MIN_PIXELS = 1280 * 720
_AUTO_MIN_CORES = 8

_QUEUED_CHUNKS = 1
"""Chunks a reader thread may hand over ahead of `read`; with the one it is filling, each decoder
holds at most two (a 1080p chunk of 32 frames is 200 MB)."""

_POLL_S = 0.1


def decode_workers_for(width: int, height: int, cpu_count: int | None) -> int:
    """How many ffmpeg decoders `VideoReader` should run for `width`x`height` frames on
    `cpu_count` cores (`os.cpu_count()`; None counts as 1): `decode.workers: auto`.

    2 for frames of 1280x720 pixels or more on 8+ cores, else 1. On the 16-core H100 box one
    decoder gives 245 fps at 1080p, two 360, three 332, four 261 (2026-11-24); smaller frames
    decode several times faster than the GPU stages need, and on small machines the second
    process only takes cores from the rest of the pipeline.
    """
    if width * height >= _AUTO_MIN_PIXELS and (cpu_count or 1) >= _AUTO_MIN_CORES:
        return 2
    return 1


class VideoReader:
    """Decode the video stream of `path` to `uint8` BGR frames `[H, W, 3]`, display-oriented.

    Frames come out at exactly `fps` (default `info.fps`): ffmpeg's `fps` filter duplicates or
    drops frames by timestamp, so variable-frame-rate input becomes constant-rate and a rate
    conversion (e.g. 30 -> 25) keeps A/V timing. ffmpeg's autorotate turns rotated phone video
    upright, so frames are `info.height x info.width`. Any pixel format (10-bit, 4:4:4) and any
    size, odd included, is converted by ffmpeg.

    Use as a context manager; `read(n)` returns batches. Leaving early kills ffmpeg. `ffmpeg`
    defaults to `find_ffmpeg()`.

    `decoders=1` (the default) runs one ffmpeg and reads its pipe straight into each batch.
    One ffmpeg process, with its pipe and its bgr24 conversion, tops out near 245 fps at 1080p
    on the 16-core H100 box; two processes give about 360 fps together (three 332, four 261;
    measured 2026-11-24; `decode_workers_for` picks the count). With `decoders=K > 1`, K
    ffmpeg processes run the same command, each with a `select` filter after `fps` and `scale`
    keeping every K-th chunk of `chunk` frames (decoder k emits chunks k, k+K, k+2K, ...;
    `n` there counts frames after the `fps` filter, so the split is exact). Each has a reader
    thread filling fresh `chunk`-frame arrays and handing them over through a queue of one;
    `read` takes chunks round-robin, so frames come out identical and in order. A read that
    lines up with one whole chunk (`n == chunk` at a chunk boundary) returns the chunk itself;
    other reads copy into a new array and keep the rest of a chunk for the next read, so pass
    the batch size you read as `chunk`. The first short (or empty) chunk in round-robin order
    ends the stream; then every ffmpeg is waited for and a failure raises `FFmpegError`.
    Leaving early (or on an exception) stops the threads and kills and reaps every ffmpeg.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        info: VideoInfo,
        fps: Fraction | None = None,
        ffmpeg: str | None = None,
        *,
        decoders: int = 1,
        chunk: int = DEFAULT_CHUNK_FRAMES,
    ):
        if decoders < 1:
            raise ValueError(f"decoders must be >= 1, got {decoders}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.path = path
        self.fps = exact_rate(fps) if fps is not None else info.fps
        self.width = info.width
        self.height = info.height
        self.decoders = decoders
        self.chunk = chunk
        self._frame_bytes = info.width * info.height * 3
        self._frames_read = 0
        self._eof = False
        ffmpeg = ffmpeg or find_ffmpeg()
        # scale is a no-op at the probed size; it's there for streams that change resolution
        # midway, which would otherwise shear every later raw frame.
        filters = f"fps={self.fps},scale={info.width}:{info.height}"

        def pipe(vf: str, what: str) -> FFmpegPipe:
            return FFmpegPipe(
                ffmpeg,
                [
                    "-i", file_arg(path),
                    "-map", f"0:{info.stream_index}",
                    "-vf", vf,
                    # The fps filter already made the timing constant (and select's gaps are
                    # meant): don't let the muxer redo it.
                    "-fps_mode", "passthrough",
                    "-f", "rawvideo", "-pix_fmt", "bgr24",
                    "pipe:1",
                ],
                stdout=True,
                what=what,
            )  # fmt: skip

        self._pipe: FFmpegPipe | None = None
        self._parallel: _ChunkedDecoders | None = None
        if decoders == 1:
            self._pipe = pipe(filters, f"decoding {path}")
        else:
            self._parallel = _ChunkedDecoders(
                [
                    pipe(
                        f"{filters},select='eq(mod(floor(n/{chunk}),{decoders}),{k})'",
                        f"decoding {path} (decoder {k + 1} of {decoders})",
                    )
                    for k in range(decoders)
                ],
                chunk,
                (info.height, info.width, 3),
                str(path),
            )

    def __enter__(self) -> VideoReader:
        if self._parallel is not None:
            self._parallel.start()
        else:
            self._pipe.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        clean = exc_type is None and self._eof
        if self._parallel is not None:
            self._parallel.close(check=clean)
        elif clean:
            self._pipe.finish()
        else:
            self._pipe.kill()

    @property
    def frames_read(self) -> int:
        """Frames returned by `read` so far."""
        return self._frames_read

    def read(self, n: int) -> np.ndarray:
        """Up to `n` frames as a new array `[b, H, W, 3]`: b < n only at the end, b == 0 after it.

        At the end ffmpeg's exit status is checked, so a decode failure raises `FFmpegError` here.
        """
        if n < 1:
            raise ValueError(f"read(n) needs n >= 1, got {n}")
        if self._parallel is not None:
            batch = self._parallel.read(n)
            self._eof = self._parallel.ended
            self._frames_read += len(batch)
            return batch
        batch = np.empty((n, self.height, self.width, 3), dtype=np.uint8)
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


class _Failed:
    """Queue item: the reader thread raised `exc`."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class _Decoder:
    """One of the K ffmpeg processes (every K-th chunk) and the thread reading its pipe."""

    def __init__(self, pipe: FFmpegPipe, index: int):
        self.pipe = pipe
        self.index = index
        self.queue: queue.Queue = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self.thread: threading.Thread | None = None
        self.started = False  # its ffmpeg was started (so it has a pid to kill and reap)
        self.drained = False  # `read` took its last (short) chunk: its ffmpeg closed stdout
        self.closed = False  # its ffmpeg was waited for or killed, and reaped


class _ChunkedDecoders:
    """`VideoReader`'s K > 1 path: chunks from K ffmpeg processes, reassembled in stream order."""

    def __init__(self, pipes: list[FFmpegPipe], chunk: int, frame_shape: tuple[int, int, int], path: str):
        self._decoders = [_Decoder(pipe, k) for k, pipe in enumerate(pipes)]
        self._chunk = chunk
        self._shape = frame_shape
        self._frame_bytes = int(np.prod(frame_shape))
        self._path = path
        self._stop = threading.Event()
        self._next = 0  # the decoder holding the next chunk
        self._current: np.ndarray | None = None  # a chunk partly handed out
        self._offset = 0  # frames of `_current` handed out
        self._failure: BaseException | None = None
        self.ended = False  # the last chunk has been taken and every ffmpeg waited for

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        try:
            for d in self._decoders:
                d.pipe.start()
                d.started = True
            for d in self._decoders:
                d.thread = threading.Thread(
                    target=self._fill, args=(d,), name=f"decode-{d.index}-{d.pipe.pid}", daemon=True
                )
                d.thread.start()
        except BaseException:
            self.close(check=False)
            raise

    def close(self, *, check: bool) -> None:
        """Stop the reader threads and reap every ffmpeg. Decoders whose last chunk was taken are
        waited for and, with `check`, a failure raises `FFmpegError`; the rest are killed first, so
        no thread stays blocked on a pipe. Idempotent."""
        self._stop.set()
        self._current = None
        for d in self._decoders:
            if d.started and not d.closed and not (check and d.drained):
                # Kill without closing our pipe end: its reader thread sees end of file and
                # returns; the pipe is closed only once no thread uses it. Not yet reaped, so
                # the pid is still this ffmpeg's.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(d.pipe.pid, signal.SIGKILL)
        for d in self._decoders:
            self._discard_queued(d)  # wakes a thread waiting to hand over a chunk
            if d.thread is not None:
                d.thread.join()
            self._discard_queued(d)
        errors: list[FFmpegError] = []
        for d in self._decoders:
            if d.closed:
                continue
            d.closed = True
            if check and d.drained:
                try:
                    d.pipe.finish()
                except FFmpegError as exc:
                    errors.append(exc)
                except BaseException:
                    self.close(check=False)
                    raise
            else:
                d.pipe.kill()
        if errors:
            raise errors[0]

    @staticmethod
    def _discard_queued(d: _Decoder) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                d.queue.get_nowait()

    # -- reader threads --------------------------------------------------------------------

    def _fill(self, d: _Decoder) -> None:
        try:
            while not self._stop.is_set():
                chunk = np.empty((self._chunk, *self._shape), dtype=np.uint8)
                got = d.pipe.readinto(chunk)
                frames, leftover = divmod(got, self._frame_bytes)
                if frames < self._chunk:
                    if leftover and not self._stop.is_set():
                        logger.warning(
                            "%s: ignoring a truncated last frame (%d of %d bytes)",
                            self._path, leftover, self._frame_bytes,
                        )  # fmt: skip
                    self._put(d, chunk[:frames])
                    return
                self._put(d, chunk)
        except BaseException as exc:  # handed to `read`, which raises it
            self._put(d, _Failed(exc))

    def _put(self, d: _Decoder, item) -> None:
        while not self._stop.is_set():
            try:
                d.queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    # -- reading ---------------------------------------------------------------------------

    def read(self, n: int) -> np.ndarray:
        if self._failure is not None:
            raise self._failure
        if self._stop.is_set() and not self.ended:
            raise RuntimeError(f"decoding {self._path}: the reader was closed")
        try:
            return self._read(n)
        except BaseException as exc:
            self._failure = exc
            self.close(check=False)
            raise

    def _read(self, n: int) -> np.ndarray:
        if self._current is None and not self.ended:
            chunk = self._next_chunk()
            if len(chunk) == n or (self.ended and len(chunk) < n):
                return chunk  # one whole chunk: no copy
            self._current, self._offset = chunk, 0
        batch = np.empty((n, *self._shape), dtype=np.uint8)
        filled = 0
        while filled < n:
            if self._current is None:
                if self.ended:
                    break
                self._current, self._offset = self._next_chunk(), 0
            take = min(n - filled, len(self._current) - self._offset)
            batch[filled : filled + take] = self._current[self._offset : self._offset + take]
            filled += take
            self._offset += take
            if self._offset == len(self._current):
                self._current = None
        return batch[:filled]

    def _next_chunk(self) -> np.ndarray:
        d = self._decoders[self._next]
        chunk = self._take(d)
        if len(chunk) == self._chunk:
            self._next = (self._next + 1) % len(self._decoders)
            return chunk
        d.drained = True
        self._end(d)
        return chunk

    def _take(self, d: _Decoder) -> np.ndarray:
        while True:
            try:
                item = d.queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not d.thread.is_alive() and d.queue.empty():
                    raise RuntimeError(f"decoder {d.index} of {self._path} stopped without its last chunk") from None
                continue
            if isinstance(item, _Failed):
                raise item.exc
            return item

    def _end(self, last: _Decoder) -> None:
        """`last` gave the stream's short chunk: every other decoder must have nothing more."""
        extra: _Decoder | None = None
        for d in self._decoders:
            if d is last:
                continue
            if len(self._take(d)):
                extra = d
                break
            d.drained = True
        self.ended = True
        self.close(check=True)  # raises an ffmpeg's failure first: it explains a disagreement
        if extra is not None:
            raise FFmpegError(
                f"parallel decoding of {self._path}: decoder {extra.index + 1} has frames past the end "
                f"of the stream (decoder {last.index + 1} ended it)"
            )

