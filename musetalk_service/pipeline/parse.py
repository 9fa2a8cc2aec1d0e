"""Parse phase: the BiSeNet blend masks of a new video, one per `mask_every` source frames.

The masks depend only on the source frame and its face box, so they are part of the avatar and
are made as each batch of new frames is prepared, from the one place below, timed as `parse`:
in a request, in the writer thread just before the batch is composed (the compositor then only
reads them) and on the compositor's CUDA stream, so a BiSeNet pass never queues behind the UNet;
in a preparation ahead of time, the same way. A prepared avatar's masks come with it, and a
request on it parses nothing (but a mask its compositor can't use: `FaceBlender.fallbacks`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from musetalk_service.pipeline.batch import Batch
from musetalk_service.pipeline.blend import FaceBlender
from musetalk_service.pipeline.timing import PhaseTimer


class ParseStage:
    """Parses the masks of each located batch's frames with a face into `blender`'s store."""

    def __init__(self, blender: FaceBlender, on_stream: Callable[[], AbstractContextManager[None]], timer: PhaseTimer):
        """`on_stream()`: where the parser runs (the compositor's stream, `Compositor.on_stream`)."""
        self.blender = blender
        self.on_stream = on_stream
        self.timer = timer

    def run(self, batch: Batch) -> Batch:
        located = batch.located
        if located is None or not located.rows or batch.prepare is None:
            return batch
        rows = located.rows
        # Not timed with gpu=True: that would wait for this thread's default stream (the UNet's);
        # the parser's own read-back of its labels already waits for its work.
        with self.timer.phase("parse"), self.on_stream():
            frames = batch.prepare
            self.blender.prepare_masks([frames[k] for k in rows], [located.boxes[k] for k in rows], [located.first + k for k in rows])
        return batch
