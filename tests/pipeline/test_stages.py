"""The overlap helpers: order kept, errors surface in the caller's thread, nothing left running."""

from __future__ import annotations

import threading
import time

import pytest

from musetalk_service.pipeline.stages import Consume, Prefetch


def test_prefetch_yields_every_item_in_order_and_runs_ahead():
    produced = []

    def produce():
        for i in range(20):
            produced.append(i)
            yield i

    stage = Prefetch("test-read", produce(), depth=2)
    time.sleep(0.2)
    assert len(produced) >= 2  # it ran ahead of the consumer...
    assert len(produced) <= 4  # ...but only by its bounded depth (+ the items in hand)
    assert list(stage) == list(range(20))
    stage.close()
    assert not stage.thread.is_alive()


def test_a_producer_failure_is_raised_to_the_consumer():
    def produce():
        yield 1
        raise ValueError("decoder broke")

    stage = Prefetch("test-read", produce())
    with pytest.raises(ValueError, match="decoder broke"):
        list(stage)
    stage.close()


def test_consume_handles_every_item_in_order_before_finish_returns():
    handled = []
    stage = Consume("test-write", handled.append, depth=2)
    for i in range(50):
        stage.put(i)
    stage.finish()
    assert handled == list(range(50))
    assert not stage.thread.is_alive()


def test_a_consumer_failure_is_raised_by_the_next_put_or_finish():
    def handle(item):
        if item == 3:
            raise OSError("encoder pipe broke")

    stage = Consume("test-write", handle, depth=1)
    with pytest.raises(OSError, match="encoder pipe broke"):
        for i in range(100):
            stage.put(i)
    assert not stage.thread.is_alive()


def test_abort_stops_a_consumer_blocked_on_slow_work():
    release = threading.Event()
    stage = Consume("test-write", lambda item: release.wait(5), depth=1)
    stage.put(1)
    release.set()
    stage.abort()
    assert not stage.thread.is_alive()
