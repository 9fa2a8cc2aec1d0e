"""The MuseTalk 1.5 UNet (a diffusers UNet2DConditionModel) and the audio positional encoding.

How the pipeline calls it (spec §6): one single-step pass, no noise schedule. The input is the
8-channel latent [masked face latent | reference latent] at 32x32, the timestep is always 0 (so the
time embedding is a constant), and `encoder_hidden_states` is `PositionalEncoding` applied to the
audio tokens [B, 10*(whisper layers+1), d_model]. The output `.sample` is the 4-channel face latent.
That call belongs to the pipeline; this module only builds and loads the networks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from musetalk_service.nets.layout import weight_file
from musetalk_service.nets.loading import build_and_load, build_from_config, load_state_dict, read_json

# The official v1.5 config, shipped in the checkout's configs/; the random-weights writer copies it.
# Located from this file rather than via settings, so that nets/ needs no settings stack.
OFFICIAL_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "musetalk.json"


class PositionalEncoding(nn.Module):
    """Vaswani sinusoidal positional encoding added to the audio tokens (spec §2.4).

    pe[p, 2i] = sin(p * 10000^(-2i/d)), pe[p, 2i+1] = cos(same); `forward(x[B,T,d])` returns
    x + pe[:, :T]. The table is computed, never learned, so it is kept out of the state dict.
    """

    def __init__(self, d_model: int = 384, max_len: int = 5000):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model must be even, got {d_model}")
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(1, max_len, d_model)
        pe[0, :, 0::2] = torch.sin(position * inv_freq)
        pe[0, :, 1::2] = torch.cos(position * inv_freq)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.size(1)]


def build_unet(config: dict, *, config_path: str | Path = "musetalk.json") -> UNet2DConditionModel:
    """A UNet2DConditionModel from its constructor kwargs; WeightsFileError naming `config_path` if invalid."""
    return build_from_config(UNet2DConditionModel, config, config_path)


def load_unet(models_dir: str | Path) -> UNet2DConditionModel:
    """Build the UNet from `musetalkV15/musetalk.json` and load `unet.pth` (or `unet.safetensors`) strictly, on CPU."""
    config_path = weight_file("unet_config").path(models_dir)
    config = read_json(config_path)
    entry = weight_file("unet")
    weights = entry.find(models_dir) or entry.path(models_dir)
    return build_and_load(lambda: build_unet(config, config_path=config_path), load_state_dict(weights), weights)
