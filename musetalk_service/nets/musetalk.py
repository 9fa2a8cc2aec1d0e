"""MuseTalk's two per-batch computations as modules, so each compiles into one graph.

`FaceGenerator` is the per-output-frame work: the audio tokens get the sinusoidal positional
encoding (applied at inference only, as the official scripts do), the UNet runs once at timestep
0 (MuseTalk's UNet is not a diffusion loop: it maps the 8-channel latent straight to the latent of
the lip-synced face), the VAE decodes it, and the pixels are rounded to uint8 BGR on the device.
Compiled together, the final scaling fuses into the decoder's last kernels.

`FaceLatentEncoder` is the per-source-frame work: the VAE encodes the face with its lower half
blanked and the whole face in one batch, and their posterior means become the UNet's input.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from musetalk_service.nets.unet import PositionalEncoding


class FaceGenerator(nn.Module):
    """`[b, 8, 32, 32]` latents + `[b, T, D]` audio tokens -> `[b, 256, 256, 3]` uint8 BGR faces."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, pe: PositionalEncoding):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.pe = pe
        # A 0-d tensor: diffusers broadcasts it to the batch, no host-to-device copy per call.
        self.register_buffer("timestep", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, latents: torch.Tensor, audio_tokens: torch.Tensor) -> torch.Tensor:
        audio = self.pe(audio_tokens)
        predicted = self.unet(latents, self.timestep, encoder_hidden_states=audio).sample
        decoded = self.vae.decode(predicted / self.vae.config.scaling_factor).sample
        # float32 before scaling: near 1.0, fp16 steps are 1/8 of an 8-bit level, enough to flip roundings.
        pixels = (decoded.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).flip(-1).contiguous()


class FaceLatentEncoder(nn.Module):
    """VAE inputs `[b, 3, 256, 256]` in [-1, 1], masked and reference -> UNet input latents `[b, 8, 32, 32]`.

    The latent is the posterior mean times the VAE scaling factor. The official code samples the
    posterior with an unseeded RNG; the mean is what training used, and it is deterministic, so
    the same frame always gives the same latent. Channels 0-3: the masked face, 4-7: the reference.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, masked: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(torch.cat([masked, reference])).latent_dist.mean * self.vae.config.scaling_factor
        masked_latents, reference_latents = latents.chunk(2, dim=0)
        return torch.cat([masked_latents, reference_latents], dim=1)
