"""Random-init weights written in exactly the official formats, for tests, demos and benchmarks.

`size="full"` gives the official architectures (real compute cost, meaningless output);
`size="tiny"` gives small networks of the same kinds so the whole pipeline runs on CPU in seconds.
Files are written as the official ones are: plain state dicts via torch.save for .pth/.bin, the
diffusers/transformers JSON configs, and the feature extractor's save_pretrained. They are read
back by the very loaders that read real weights. One network is alive at a time (full size peaks
at the UNet's ~3.4 GB, plus its copy while being saved).
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import diffusers
import torch
from diffusers import AutoencoderKL
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperForConditionalGeneration

from musetalk_service.nets import bisenet, fan, s3fd
from musetalk_service.nets.layout import PROVENANCE_FILE, weight_file
from musetalk_service.nets.loading import read_json
from musetalk_service.nets.unet import OFFICIAL_CONFIG, build_unet

logger = logging.getLogger(__name__)

Size = Literal["tiny", "full"]

# Tiny UNet: two levels (32x32 -> 16x16) of 32/64 channels, cross-attending to the tiny whisper's 64 dims.
TINY_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 4,
    "block_out_channels": [32, 64],
    "center_input_sample": False,
    "cross_attention_dim": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 32,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/sd-vae-ft-mse config.json (spec §2.2).
FULL_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# Four blocks keep the 8x downsampling (256x256 face -> 4x32x32 latent) with few channels.
TINY_VAE_CONFIG = {
    **FULL_VAE_CONFIG,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}

# openai/whisper-tiny (spec §2.3).
FULL_WHISPER_CONFIG = {
    "d_model": 384,
    "encoder_layers": 4,
    "decoder_layers": 4,
    "encoder_attention_heads": 6,
    "decoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "vocab_size": 51865,
}
# Four encoder layers keep 10*(4+1) = 50 audio tokens per frame, as the real model. transformers 5
# rejects a vocab smaller than the special token ids, so the vocab stays; the decoder is minimal.
TINY_WHISPER_CONFIG = {
    **FULL_WHISPER_CONFIG,
    "d_model": 64,
    "decoder_layers": 1,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
}


def write_random_weights(models_dir: str | Path, size: Size = "tiny", seed: int = 0) -> Path:
    """Fill `models_dir` with random weights in the official layout and formats; returns the folder.

    `size` is "tiny" (test networks, CPU-fast) or "full" (the official architectures). The same
    `seed` gives the same files. Writes PROVENANCE.json {"kind": "random", "size": ..., "seed": ...}.
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    # Dropped first and written last: a run that stops half-way leaves the folder "custom".
    (models_dir / PROVENANCE_FILE).unlink(missing_ok=True)
    full = size == "full"
    logger.info("writing %s random weights to %s", size, models_dir)

    unet_config = read_json(OFFICIAL_CONFIG) if full else TINY_UNET_CONFIG
    _write_json(weight_file("unet_config").path(models_dir), unet_config)
    _save_random(weight_file("unet").path(models_dir), seed, lambda: build_unet(unet_config))

    vae_config = {**(FULL_VAE_CONFIG if full else TINY_VAE_CONFIG), "_diffusers_version": diffusers.__version__}
    _write_json(weight_file("vae_config").path(models_dir), vae_config)
    _save_random(weight_file("vae").path(models_dir), seed, lambda: AutoencoderKL.from_config(vae_config))

    whisper_config = WhisperConfig(**(FULL_WHISPER_CONFIG if full else TINY_WHISPER_CONFIG))
    whisper_dir = weight_file("whisper_config").path(models_dir).parent
    whisper_config.save_pretrained(whisper_dir)
    WhisperFeatureExtractor(feature_size=whisper_config.num_mel_bins).save_pretrained(whisper_dir)
    _save_random(weight_file("whisper").path(models_dir), seed, lambda: WhisperForConditionalGeneration(whisper_config))

    _save_random(weight_file("face_parser").path(models_dir), seed, lambda: bisenet.build(size))
    _save_random(weight_file("face_detector").path(models_dir), seed, lambda: s3fd.build(size))
    _save_random(weight_file("landmarker").path(models_dir), seed, lambda: fan.build(size))

    _write_json(models_dir / PROVENANCE_FILE, {"kind": "random", "size": size, "seed": seed})
    return models_dir


def _save_random(path: Path, seed: int, build: Callable[[], torch.nn.Module]) -> None:
    # A forked RNG: the caller's torch random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    state = model.state_dict()
    _atomic(path, lambda tmp: torch.save(state, tmp))
    logger.info("wrote %s (%.2f M parameters)", path, sum(p.numel() for p in model.parameters()) / 1e6)
    del model, state
    gc.collect()


def _write_json(path: Path, data: dict) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    # Written aside and renamed, so an interrupted run never leaves a truncated file under the real name.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)
