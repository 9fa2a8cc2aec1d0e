"""The sd-vae-ft-mse autoencoder (diffusers AutoencoderKL) from the `sd-vae/` diffusers folder.

The official file was saved by diffusers 0.4.2, whose mid-block attention used the names
query/key/value/proj_attn; current diffusers calls them to_q/to_k/to_v/to_out.0 (same shapes).
`load_vae` renames the old keys, so either generation of the file loads.
"""

from __future__ import annotations

import re
from pathlib import Path

from diffusers import AutoencoderKL

from musetalk_service.nets.layout import weight_file
from musetalk_service.nets.loading import StateDict, build_and_load, build_from_config, load_state_dict, read_json

# diffusers' default, which applies because the official config.json has no scaling_factor.
DEFAULT_SCALING_FACTOR = 0.18215

_LEGACY_ATTENTION = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
_RENAMED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_attention_keys(state: StateDict) -> StateDict:
    """Map diffusers<=0.13 VAE attention names (query/key/value/proj_attn) to the current ones."""
    renamed = {}
    for key, tensor in state.items():
        match = _LEGACY_ATTENTION.match(key)
        if match:
            key = f"{match[1]}.{_RENAMED[match[2]]}.{key[match.end():]}"
        renamed[key] = tensor
    return renamed


def build_vae(config: dict, *, config_path: str | Path = "config.json") -> AutoencoderKL:
    """An AutoencoderKL from a diffusers config dict; WeightsFileError naming `config_path` if invalid."""
    return build_from_config(AutoencoderKL, config, config_path)


def load_vae(models_dir: str | Path) -> AutoencoderKL:
    """Build the VAE from `sd-vae/config.json` and load its weights (.bin or .safetensors) strictly, on CPU."""
    config_path = weight_file("vae_config").path(models_dir)
    config = read_json(config_path)
    entry = weight_file("vae")
    weights = entry.find(models_dir) or entry.path(models_dir)
    state = rename_legacy_attention_keys(load_state_dict(weights))
    return build_and_load(lambda: build_vae(config, config_path=config_path), state, weights)


def scaling_factor(vae: AutoencoderKL) -> float:
    """The latent scale the pipeline multiplies encoder latents by (and divides by before decoding)."""
    return float(vae.config.scaling_factor)
