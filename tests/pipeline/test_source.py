"""The frame store that keeps a cycling video's frames on disk."""

from __future__ import annotations

import numpy as np

from musetalk_service.pipeline.source import FrameStore


def test_the_frame_store_takes_an_empty_batch_and_reads_back_what_it_was_given(tmp_path):
    """The decoder's last read is empty when the batch size divides the frame count: storing it
    must be a no-op (it once raised 'memoryview: cannot cast view with zeros in shape')."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 4, 6, 3), dtype=np.uint8)
    store = FrameStore(tmp_path / "frames.raw", frames.shape[1:])
    try:
        store.append(frames[:3])
        store.append(frames[:0])
        store.append(frames[3:])
        assert store.count == 5
        assert np.array_equal(store.read([4, 0, 2]), frames[[4, 0, 2]])
    finally:
        store.close()
    assert not (tmp_path / "frames.raw").exists()
