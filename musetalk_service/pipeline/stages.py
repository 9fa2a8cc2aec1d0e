"""Threads with bounded queues, so decoding, the GPU models and compose+encode overlap.

The wall time then approaches the slowest stage instead of the sum of all. Queues are bounded (a
couple of batches), so memory stays flat however long the video is, and a slow stage holds the
others back instead of letting work pile up. Numpy, OpenCV, pipe I/O and CUDA synchronisation
release the GIL, which is what lets these threads run at the same time.

A failure in any stage stops the others and is re-raised in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()
_POLL_S = 0.1


class StageError(RuntimeError):
    """Raised in place of a stage whose thread died without an exception of its own."""


class _Worker:
    def __init__(self, name: str, target: Callable[[], None]):
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._target = target
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self.error = exc
            self.stop.set()

    def _put(self, q: queue.Queue, item: object) -> bool:
        """Put unless stopped; False when the stage was stopped while waiting for room."""
        while not self.stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False


class Prefetch(_Worker, Generic[T]):
    """Runs `produce` on a thread, `depth` items ahead of the consumer; iterate to consume."""

    def __init__(self, name: str, produce: Iterator[T], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._produce = produce
        super().__init__(name, self._fill)
        self.thread.start()

    def _fill(self) -> None:
        for item in self._produce:
            if not self._put(self._queue, item):
                return
        self._put(self._queue, _END)

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self.error is not None:
                    raise self.error
                if not self.thread.is_alive() and self._queue.empty():
                    raise StageError(f"{self.thread.name} ended without its last item")
                continue
            if item is _END:
                return
            yield item

    def close(self) -> None:
        """Stop producing and wait for the thread (call before closing what it reads from)."""
        self.stop.set()
        self.thread.join()


class Consume(_Worker, Generic[T]):
    """Runs `handle(item)` on a thread for each item `put`, at most `depth` items waiting."""

    def __init__(self, name: str, handle: Callable[[T], None], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._handle = handle
        super().__init__(name, self._drain)
        self.thread.start()

    def _drain(self) -> None:
        while not self.stop.is_set():
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is _END:
                return
            self._handle(item)

    def put(self, item: T) -> None:
        """Hand over an item; blocks while the queue is full; raises if the stage has failed."""
        if not self._put(self._queue, item) or self.error is not None:
            self._raise()

    def finish(self) -> None:
        """Wait for every item put so far to be handled; raises the stage's error if it failed."""
        if not self._put(self._queue, _END):
            self._raise()
        self.thread.join()
        if self.error is not None:
            self._raise()

    def abort(self) -> None:
        """Stop without handling what is still queued, and wait for the thread."""
        self.stop.set()
        self.thread.join()

    def _raise(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
        raise StageError(f"{self.thread.name} stopped")
