"""Preparing a video: its face boxes, VAE latents and blend masks, built batch by batch.

`AvatarPreparation` is the one preparation stream. It is fed a video's new source frames in
order, as `Batch.prepare`, through three phases: the face phase (`faces.FaceStage`: boxes and
the 256x256 crops cut from them, the face thread), the VAE encode (`latents.LatentStage`, the GPU
thread) and the masks (`parse.ParseStage`, the writer thread, on the compositor's stream), and
`finish` gives the `Avatar`. The runner drives it the same way whether it prepares an avatar
ahead of time (POST /avatars, the cache's build: every batch is prepared only) or inside a
lip-sync request on a video the cache has not seen (each batch prepared just before it is
generated, then the frames the output did not reach), so both give the same avatar and the video
is decoded once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from fractions import Fraction
from pathlib import Path
from typing import Any

from musetalk_service.contract import LipsyncRequest
from musetalk_service.errors import NoFace, NoVideoStream
from musetalk_service.pipeline.avatar_cache import Avatar
from musetalk_service.pipeline.batch import Batch
from musetalk_service.pipeline.blend import FaceBlender
from musetalk_service.pipeline.faces import FaceLocator, FaceStage
from musetalk_service.pipeline.latents import LatentStage
from musetalk_service.pipeline.parse import ParseStage
from musetalk_service.pipeline.source import SourceFrames
from musetalk_service.pipeline.timing import PhaseTimer
from musetalk_service.settings import FaceSettings


class AvatarPreparation:
    """One video's avatar under construction (see the module docstring)."""

    def __init__(
        self, models: Any, request: LipsyncRequest, face: FaceSettings, fps: Fraction, prep_batch: int, blender: FaceBlender,
        on_stream: Callable[[], AbstractContextManager[None]], source: SourceFrames, timer: PhaseTimer,
    ):  # fmt: skip
        """`blender`: where the masks go (the request's compositor reads them there); `on_stream`:
        where the parser runs (the compositor's stream); `source`: the frames' source, whose
        `frame_count` becomes known at the video's end."""
        self.request = request
        self.source = source
        self.fps = fps
        self.blender = blender
        self.faces = FaceStage(FaceLocator(models, request, face, fps), models.device, prep_batch, timer)
        self.latents = LatentStage(models, timer)
        self.masks = ParseStage(blender, on_stream, timer)

    @property
    def boxes(self) -> list:
        """Every located source frame's box so far (the face thread appends to it)."""
        return self.faces.boxes

    def encode(self, batch: Batch) -> Batch:
        """The GPU thread's part: the batch's latents; NoFace as soon as the whole video is
        located without a face (nothing could be generated)."""
        self.latents.run(batch)
        frame_count = self.source.frame_count
        if frame_count is not None and self.faces.located >= frame_count and not self.faces.has_face:
            raise NoFace(f"{self.request.video_path}: no face found in any of the {self.faces.located} frames tried")
        return batch

    def finish(self, key: str, options: dict, width: int, height: int, video_path: Path) -> Avatar:
        """The avatar of every frame fed so far. Raises NoFace when no frame had a face."""
        boxes = self.faces.boxes
        if not boxes:
            raise NoVideoStream(f"{video_path}: the video stream has no decodable frames")
        if not self.faces.has_face:
            raise NoFace(f"{video_path}: no face found in any of the {len(boxes)} frames tried")
        return Avatar(
            key=key,
            frame_count=len(boxes),
            fps=self.fps,
            width=width,
            height=height,
            boxes=tuple(boxes),
            latents=self.latents.encoded(),
            masks=self.blender.export_masks(),
            options=options,
            video=str(Path(video_path).resolve()),
        )
