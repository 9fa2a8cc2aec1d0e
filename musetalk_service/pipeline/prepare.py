"""Preparing a video: its face boxes, VAE latents and blend masks, built batch by batch.

`AvatarBuilder` is fed the video's frames in order, as they are decoded. The runner uses it two
ways: alone, to prepare an avatar ahead of time (`LipsyncPipeline.prepare_avatar`), and inside a
lip-sync request on a video the cache has not seen, where each batch is prepared just before it
is generated, so the video is decoded once and preparation overlaps the UNet and the encoder.

The work is split by where it runs: `locate` (face boxes, and the 256x256 crops cut from them)
is the face thread's, on a CUDA stream of its own so its waits for results never wait for the
UNet; `encode` (the VAE) is the GPU thread's. The crops are cut in the face thread because the GPU
thread bounds a new video (H100, 2026-11-24: 17.6 s busy of 19.3 s, the face thread 12.4 s).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musetalk_service.errors import NoFace, NoVideoStream
from musetalk_service.pipeline.avatar_cache import LATENT_SHAPE, Avatar, MaskEntry
from musetalk_service.pipeline.faces import FaceLocator
from musetalk_service.pipeline.frames import DeviceFrames
from musetalk_service.pipeline.latents import FACE_SIZE, crop_faces, encode_crops
from musetalk_service.contract import FaceBox, LipsyncRequest
from musetalk_service.nets.runtime import PREP_BATCH
from musetalk_service.settings import FaceSettings

@dataclass(frozen=True)
class LocatedFrames:
    """The face phase's result for consecutive source frames, from `first` on."""

    first: int
    boxes: list[FaceBox | None]
    rows: list[int]
    """Positions (in this batch) of the frames with a face."""
    crops: np.ndarray
    """The faces of `rows`, `[len(rows), 256, 256, 3]` BGR, as `latents.crop_faces` cuts them for the VAE."""


class AvatarBuilder:
    """Accumulates one video's avatar (see the module docstring)."""

    def __init__(self, models: Any, request: LipsyncRequest, face: FaceSettings, fps: Fraction):
        self.models = models
        self.request = request
        self.fps = fps
        self.locator = FaceLocator(models, request, face, fps)
        self.boxes: list[FaceBox | None] = []
        # fp16 as the cache keeps them, so a cached avatar generates exactly what its first request did.
        self._latents = torch.zeros((0, *LATENT_SHAPE), device=models.device, dtype=torch.float16)
        self._encoded = 0
        cuda = torch.device(models.device).type == "cuda"
        self._stream = torch.cuda.Stream(models.device) if cuda else None

    @property
    def located(self) -> int:
        return len(self.boxes)

    @property
    def has_face(self) -> bool:
        return any(box is not None for box in self.boxes)

    def locate(self, frames: np.ndarray | DeviceFrames) -> LocatedFrames:
        """Boxes and face crops of the next source frames `[b, H, W, 3]`, host or device (face thread)."""
        first = len(self.boxes)
        boxes: list[FaceBox | None] = []
        context = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with context:
            start = 0
            while start < len(frames):
                # Runs end on multiples of PREP_BATCH, however the caller's batches fall.
                end = min(len(frames), start + PREP_BATCH - (first + start) % PREP_BATCH)
                boxes += self.locator.locate(frames[start:end], range(first + start, first + end))
                start = end
        self.boxes.extend(boxes)
        rows = [k for k, box in enumerate(boxes) if box is not None]
        # Views of the frames, not `frames[rows]`: that would copy whole 1080p frames to crop them.
        crops = crop_faces([frames[k] for k in rows], [boxes[k] for k in rows]) if rows else np.empty((0, FACE_SIZE, FACE_SIZE, 3), np.uint8)
        return LocatedFrames(first, boxes, rows, crops)

    def encode(self, located: LocatedFrames) -> None:
        """VAE-encode a located batch's faces into the avatar's latents (GPU thread, in order)."""
        if located.first != self._encoded:
            raise ValueError(f"batches must be encoded in order: expected frame {self._encoded}, got {located.first}")
        end = located.first + len(located.boxes)
        if end > len(self._latents):
            grown = torch.zeros((max(end, 2 * len(self._latents)), *LATENT_SHAPE), device=self._latents.device, dtype=self._latents.dtype)
            grown[: self._encoded] = self._latents[: self._encoded]
            self._latents = grown
        if located.rows:
            rows = torch.tensor([located.first + k for k in located.rows], device=self._latents.device)
            self._latents[rows] = encode_crops(self.models, located.crops).to(self._latents.dtype)
        self._encoded = end

    def latents(self, source_indices: list[int]) -> torch.Tensor:
        """Latents `[b, 8, 32, 32]` (model device) of encoded source frames."""
        if max(source_indices) >= self._encoded:
            raise ValueError(f"frame {max(source_indices)} is not encoded yet ({self._encoded} are)")
        return self._latents[source_indices].to(self.models.dtype)

    def finish(self, key: str, options: dict, width: int, height: int, video_path: Path, masks: dict[int, MaskEntry]) -> Avatar:
        """The avatar of every frame fed so far. Raises NoFace when no frame had a face."""
        if not self.boxes:
            raise NoVideoStream(f"{video_path}: the video stream has no decodable frames")
        if not self.has_face:
            raise NoFace(f"{video_path}: no face found in any of the {len(self.boxes)} frames tried")
        return Avatar(
            key=key,
            frame_count=len(self.boxes),
            fps=self.fps,
            width=width,
            height=height,
            boxes=tuple(self.boxes),
            latents=self._latents[: self._encoded].to("cpu", torch.float16),
            masks=masks,
            options=options,
            video=str(Path(video_path).resolve()),
        )
