"""Per-phase wall-clock accounting.

Phases interleave batch by batch, so each phase's time is the sum of its slices. GPU work is
asynchronous: a `sync` callable (torch.cuda.synchronize on CUDA) is called at the end of a slice so
the time lands in the phase that queued the work, not in whichever phase waits for it next.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from musetalk_service.contract import PHASES


class PhaseTimer:
    def __init__(self, sync: Callable[[], None] | None = None):
        self._sync = sync
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._started = time.perf_counter()

    @contextmanager
    def phase(self, name: str, *, gpu: bool = False) -> Iterator[None]:
        """Add the time spent inside the block to `name`; `gpu` waits for queued device work first."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if gpu and self._sync is not None:
                self._sync()
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        """Seconds per phase plus `total`, the wall time since the timer was made."""
        out = {name: round(seconds, 4) for name, seconds in self._seconds.items()}
        out["total"] = round(time.perf_counter() - self._started, 4)
        return out
