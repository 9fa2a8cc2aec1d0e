"""VAE-encode phase: crop each face box, squash it to 256x256 and encode the UNet's 8-channel input.

Channels 0-3 are the latent of the face with its lower half blanked (the part the UNet repaints),
channels 4-7 the latent of the whole face (the reference). Both come from the same source frame, as
in official inference, so a source frame's latent can be cached and reused for every output frame
that shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from musetalk_service.parallel import for_each_index
from musetalk_service.contract import FaceBox
from musetalk_service.pipeline.batch import Batch
from musetalk_service.pipeline.timing import PhaseTimer

if TYPE_CHECKING:
    from musetalk_service.pipeline.faces import LocatedFrames

FACE_SIZE = 256
"""The VAE works on 256x256 faces (32x32 latents)."""


def crop_faces(frames: Sequence[np.ndarray] | np.ndarray, boxes: Sequence[FaceBox]) -> np.ndarray:
    """Crop `frame[y1:y2, x1:x2]` and resize it to 256x256 -> `[b, 256, 256, 3]` uint8 BGR.

    The box is stretched to the square whatever its aspect ratio, and Lanczos is used, as in the
    official scripts and training data; the model has only ever seen faces squashed this way.
    """
    if len(frames) != len(boxes):
        raise ValueError(f"{len(frames)} frames but {len(boxes)} boxes")
    crops = [frame[y1:y2, x1:x2] for frame, (x1, y1, x2, y2) in zip(frames, boxes)]
    for frame, box, crop in zip(frames, boxes, crops):
        if crop.size == 0:
            raise ValueError(f"face box {tuple(box)} is empty in a {frame.shape[1]}x{frame.shape[0]} frame")
    out = np.empty((len(boxes), FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)

    def resize(i: int) -> None:
        out[i] = cv2.resize(crops[i], (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)

    # About 1.6 ms of Lanczos per 1080p face: a batch of 32 would be 50 ms of the GPU thread's time.
    for_each_index(resize, len(crops))
    return out


def vae_inputs(faces_bgr: np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE inputs for 256x256 BGR faces: (masked, reference), each `[b, 3, 256, 256]` float32 in [-1, 1].

    The masked copy has rows 128..255 (the whole lower half, every column) at -1, which is what the
    official code gets by zeroing them before normalising and what training does directly.
    """
    # Upload the uint8 pixels and convert (and reorder) on the device: a quarter of the bytes over
    # the bus, and no copy on the host.
    rgb = torch.from_numpy(np.ascontiguousarray(faces_bgr)).to(device).flip(-1).permute(0, 3, 1, 2)
    reference = rgb.to(torch.float32).div_(127.5).sub_(1.0)
    masked = reference.clone()
    masked[:, :, FACE_SIZE // 2 :, :] = -1.0
    return masked, reference


def encode_faces(models: Any, frames: Sequence[np.ndarray] | np.ndarray, boxes: Sequence[FaceBox]) -> torch.Tensor:
    """UNet input latents `[b, 8, 32, 32]` (model device and dtype) for frames that have a face box."""
    return encode_crops(models, crop_faces(frames, boxes))


def encode_crops(models: Any, faces_bgr: np.ndarray) -> torch.Tensor:
    """UNet input latents `[b, 8, 32, 32]` (model device and dtype) for `crop_faces`' 256x256 faces.

    Both copies go through one batched VAE encode (`nets.musetalk.FaceLatentEncoder`, the
    bundle's fixed-batch `latent_encoder`): posterior means, so the same frame always gives the
    same latent.
    """
    masked, reference = vae_inputs(faces_bgr, models.device)
    return models.latent_encoder(masked.to(models.dtype), reference.to(models.dtype))


LATENT_SHAPE = (8, 32, 32)
"""One source frame's UNet input: masked and reference latents, 4 channels each."""


class LatentStage:
    """VAE-encode phase of a new video (the GPU thread): each located batch's face crops into the
    video's latents, batches in source order.

    Kept in fp16, as the avatar cache keeps them, so a cached avatar generates exactly what its
    first request did.
    """

    def __init__(self, models: Any, timer: PhaseTimer):
        self.models = models
        self.timer = timer
        self._latents = torch.zeros((0, *LATENT_SHAPE), device=models.device, dtype=torch.float16)
        self._encoded = 0

    def run(self, batch: Batch) -> Batch:
        if batch.located is not None:
            with self.timer.phase("vae_encode", gpu=True):
                self.encode(batch.located)
        return batch

    def encode(self, located: LocatedFrames) -> None:
        """VAE-encode a located batch's faces into the latents (in order)."""
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
        """Latents `[b, 8, 32, 32]` (model device and dtype) of encoded source frames."""
        if max(source_indices) >= self._encoded:
            raise ValueError(f"frame {max(source_indices)} is not encoded yet ({self._encoded} are)")
        return self._latents[source_indices].to(self.models.dtype)

    def encoded(self) -> torch.Tensor:
        """Every encoded frame's latents, fp16 on the CPU (as an `Avatar` holds them)."""
        return self._latents[: self._encoded].to("cpu", torch.float16)
