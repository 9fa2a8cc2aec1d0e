"""The batch record: what one batch carries from stage to stage (read -> face -> GPU -> compose+encode).

Each stage fills in its part and hands the record on; no stage reads another's locals. A batch is
either a batch of output frames (with, for a new video, the source frames prepared with them), or,
past the output's end and when an avatar is prepared ahead of time, source frames prepared only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from musetalk_service.pipeline.frames import DeviceFrames

if TYPE_CHECKING:
    from musetalk_service.pipeline.faces import LocatedFrames


@dataclass
class Batch:
    """One batch (see the module docstring). The read stage makes it; later stages fill in the rest."""

    indices: list[int]
    """Output frame indices, consecutive (empty: source frames prepared only)."""
    sources: list[int]
    """The source frame each output frame shows (ping-pong past the video's end)."""
    frames: np.ndarray
    """The output frames' source pixels as decoded: BGR `[n, H, W, 3]` or yuv420p `[n, bytes]`.
    The batch's own: the compositor writes into them."""
    weights: np.ndarray
    """Each output frame's silence weight (1 generated, 0 the source frame as it is, fades between)."""
    bgr: np.ndarray | DeviceFrames | None
    """The output frames as BGR, where a mask may have to be parsed from them: `frames` when
    decoded to BGR, a new video's planes made BGR on the device, None for a prepared avatar's planes."""
    prepare: np.ndarray | DeviceFrames | None
    """A new video's source frames seen for the first time in this batch, BGR, in source order
    (the leading output frames, then any decoded ahead for whole tracking runs); None: none."""
    located: LocatedFrames | None = None
    """The face phase's result for `prepare`."""
    rows: list[int] = field(default_factory=list)
    """Positions of the output frames generated: speaking (weight > 0) and with a face."""
    faces: torch.Tensor | np.ndarray | None = None
    """The generated faces `[len(rows), 256, 256, 3]` BGR uint8, on the device for a device compositor."""
    ready: torch.cuda.Event | None = None
    """Recorded after `faces` was made (CUDA): the compositor's stream waits for it, not the device."""
