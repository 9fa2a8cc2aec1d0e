"""UNet phase: one denoising-free UNet step plus the VAE decode, latents and audio in, BGR faces out.

MuseTalk's UNet is not a diffusion loop: at timestep 0 it maps the 8-channel latent (masked face +
reference) and the audio tokens straight to the latent of the lip-synced face.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch


@lru_cache(maxsize=None)
def _timestep_zero(device: torch.device) -> torch.Tensor:
    # A 0-d tensor: diffusers broadcasts it to the batch without a host-to-device copy per call.
    return torch.zeros((), dtype=torch.long, device=device)


def generate_faces(models: Any, latents: torch.Tensor, audio_tokens: torch.Tensor) -> np.ndarray:
    """`generate_faces_tensor`, copied to the host as a numpy array (the CPU blend path)."""
    return generate_faces_tensor(models, latents, audio_tokens).cpu().numpy()


def generate_faces_tensor(models: Any, latents: torch.Tensor, audio_tokens: torch.Tensor) -> torch.Tensor:
    """Generate lip-synced faces: `[b, 8, 32, 32]` latents + `[b, T, D]` audio tokens -> `[b, 256, 256, 3]` uint8 BGR.

    The audio tokens get the sinusoidal positional encoding (applied at inference only, as the
    official scripts do), the UNet runs once at timestep 0, and its output latent is decoded by the
    VAE. The result stays on the model device (the GPU compose path reads it there).
    """
    if latents.shape[0] != audio_tokens.shape[0]:
        raise ValueError(f"{latents.shape[0]} latents but {audio_tokens.shape[0]} audio windows")
    device = torch.device(models.device)
    with torch.inference_mode():
        audio = models.pe(audio_tokens.to(device=device, dtype=models.dtype))
        sample = latents.to(device=device, dtype=models.dtype)
        predicted = models.unet(sample, _timestep_zero(device), encoder_hidden_states=audio).sample
        vae = models.vae
        decoded = vae.decode(predicted / vae.config.scaling_factor).sample
        # float32 before scaling: near 1.0, fp16 steps are 1/8 of an 8-bit level, enough to flip roundings.
        pixels = (decoded.float() / 2 + 0.5).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).flip(-1).contiguous()
