"""for_each_index: every index once, errors re-raised, no thread left behind."""

from __future__ import annotations

import threading

import pytest

from musetalk_service.parallel import for_each_index


@pytest.mark.parametrize("count, threads", [(0, 4), (1, 4), (7, 1), (33, 4)])
def test_every_index_is_done_once(count, threads):
    done = [0] * count
    lock = threading.Lock()

    def work(i):
        with lock:
            done[i] += 1

    for_each_index(work, count, threads)
    assert done == [1] * count


def test_an_error_is_raised_and_no_thread_outlives_the_call():
    before = threading.active_count()

    def work(i):
        if i == 5:
            raise ValueError("bad crop 5")

    with pytest.raises(ValueError, match="bad crop 5"):
        for_each_index(work, 20)
    assert threading.active_count() == before
