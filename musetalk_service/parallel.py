"""Per-frame OpenCV work spread over a few threads.

cv2 releases the GIL while it warps or resizes, so a batch of face crops (32 FAN crops, 32
Lanczos resizes to 256x256: 0.7-1.6 ms each at 1080p on the H100 box) runs several at a time on
threads. The pool lives for one call: starting it costs far less than the batch, and no thread
outlives a request.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

CROP_THREADS = 4
"""Enough to take a batch's crops off the critical path without crowding the decoder and the
encoders, which need the machine's other cores."""


def for_each_index(work: Callable[[int], None], count: int, threads: int = CROP_THREADS) -> None:
    """Call `work(i)` for i in range(count), on up to `threads` threads; re-raises the first error."""
    if count <= 1 or threads <= 1:
        for i in range(count):
            work(i)
        return
    with ThreadPoolExecutor(max_workers=min(threads, count), thread_name_prefix="musetalk-crop") as pool:
        for _ in pool.map(work, range(count)):
            pass
