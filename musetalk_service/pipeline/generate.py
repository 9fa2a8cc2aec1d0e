"""UNet phase: one denoising-free UNet step plus the VAE decode, latents and audio in, BGR faces out.

The computation is `nets.musetalk.FaceGenerator`, run by the bundle's fixed-batch (on CUDA,
compiled) `generator`; this module puts the inputs on the device and checks they match, and
`GenerateStage` runs it for the frames of each batch that get a generated mouth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from musetalk_service.contract import FaceBox
from musetalk_service.pipeline.audio import AudioFeatures
from musetalk_service.pipeline.batch import Batch
from musetalk_service.pipeline.timing import PhaseTimer


def generate_faces(models: Any, latents: torch.Tensor, audio_tokens: torch.Tensor) -> np.ndarray:
    """`generate_faces_tensor`, copied to the host as a numpy array (the CPU blend path)."""
    return generate_faces_tensor(models, latents, audio_tokens).cpu().numpy()


def generate_faces_tensor(models: Any, latents: torch.Tensor, audio_tokens: torch.Tensor) -> torch.Tensor:
    """Generate lip-synced faces: `[b, 8, 32, 32]` latents + `[b, T, D]` audio tokens -> `[b, 256, 256, 3]` uint8 BGR.

    The result stays on the model device (the GPU compose path reads it there).
    """
    if latents.shape[0] != audio_tokens.shape[0]:
        raise ValueError(f"{latents.shape[0]} latents but {audio_tokens.shape[0]} audio windows")
    device, dtype = torch.device(models.device), models.dtype
    return models.generator(latents.to(device=device, dtype=dtype), audio_tokens.to(device=device, dtype=dtype))


class GenerateStage:
    """UNet phase of a request (the GPU thread): the faces of each batch's frames that speak
    (silence weight > 0) and have a face; the others pass through as their source frames.

    Counts what it generated and the speaking frames without a face, for the result.
    """

    def __init__(
        self, models: Any, audio: AudioFeatures, boxes: Sequence[FaceBox | None], latents: Callable[[list[int]], torch.Tensor],
        *, on_device: bool, timer: PhaseTimer,
    ):  # fmt: skip
        """`boxes`, `latents(source_indices)`: the avatar's (prepared, or prepared in this pass
        ahead of each batch). `on_device`: the faces stay on the device for a device compositor."""
        self.models = models
        self.audio = audio
        self.boxes = boxes
        self.latents = latents
        self.on_device = on_device
        self.timer = timer
        self._generate = generate_faces_tensor if on_device else generate_faces
        self._events = on_device and torch.device(models.device).type == "cuda"
        self.generated_frames = 0
        self.frames_without_face = 0

    def run(self, batch: Batch) -> Batch:
        speaking = [k for k in range(len(batch.indices)) if batch.weights[k] > 0]
        batch.rows = [k for k in speaking if self.boxes[batch.sources[k]] is not None]
        self.frames_without_face += len(speaking) - len(batch.rows)
        self.generated_frames += len(batch.rows)
        if not batch.rows:
            return batch
        with self.timer.phase("unet", gpu=not self.on_device):
            latents = self.latents([batch.sources[k] for k in batch.rows])
            batch.faces = self._generate(self.models, latents, self.audio.windows([batch.indices[k] for k in batch.rows]))
            if self._events:
                # The composer's stream waits for this event, not for the whole device; waiting
                # on it here keeps the UNet's busy time honest.
                batch.ready = torch.cuda.Event()
                batch.ready.record()
                batch.ready.synchronize()
        return batch
