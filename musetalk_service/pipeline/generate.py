"""UNet phase: one denoising-free UNet step plus the VAE decode, latents and audio in, BGR faces out.

The computation is `nets.musetalk.FaceGenerator`, run by the bundle's fixed-batch (on CUDA,
compiled) `generator`; this module puts the inputs on the device and checks they match.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


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
