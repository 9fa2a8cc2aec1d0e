"""The full-size architectures match the spec's sizes; the hand-written pieces match their formulas."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from musetalk_service.nets import bisenet
from musetalk_service.nets.layout import weight_file
from musetalk_service.nets.loading import load_state_dict, read_json
from musetalk_service.nets.random_weights import FULL_VAE_CONFIG, FULL_WHISPER_CONFIG
from musetalk_service.nets.unet import OFFICIAL_CONFIG, PositionalEncoding, build_unet
from musetalk_service.nets.vae import DEFAULT_SCALING_FACTOR, load_vae, scaling_factor


def _millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def test_full_unet_has_the_official_size():
    with torch.device("meta"):
        unet = build_unet(read_json(OFFICIAL_CONFIG))
    assert _millions(unet) == pytest.approx(849.95, abs=0.01)
    assert len(unet.state_dict()) == 686  # spec §1: 686 tensors in unet.pth
    assert unet.config.cross_attention_dim == 384


def test_full_vae_has_the_official_size_and_scale():
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(FULL_VAE_CONFIG)
    assert _millions(vae) == pytest.approx(83.65, abs=0.01)
    assert scaling_factor(vae) == DEFAULT_SCALING_FACTOR == 0.18215


def test_full_whisper_encoder_has_the_official_size():
    with torch.device("meta"):
        encoder = WhisperEncoder(WhisperConfig(**FULL_WHISPER_CONFIG))
    assert _millions(encoder) == pytest.approx(8.21, abs=0.01)


def test_full_bisenet_has_the_official_size_and_checkpoint_keys():
    with torch.device("meta"):
        model = bisenet.build("full")
    assert _millions(model) == pytest.approx(13.30, abs=0.01)
    keys = model.state_dict().keys()
    # Names as in zllrunning's 79999_iter.pth, spot-checked across every part of the network.
    for key in (
        "cp.resnet.conv1.weight",
        "cp.resnet.layer2.0.downsample.0.weight",
        "cp.arm32.conv_atten.weight",
        "cp.arm16.bn_atten.running_var",
        "cp.conv_avg.conv.weight",
        "ffm.convblk.bn.weight",
        "ffm.conv2.weight",
        "conv_out.conv_out.weight",
        "conv_out16.conv.conv.weight",
        "conv_out32.conv_out.weight",
    ):
        assert key in keys
    assert model.state_dict()["conv_out.conv_out.weight"].shape == (19, 256, 1, 1)


def test_bisenet_returns_main_logits_at_input_size(tiny_models_dir):
    model = bisenet.load(weight_file("face_parser").path(tiny_models_dir))
    assert model.cp.resnet.conv1.out_channels == bisenet.WIDTHS["tiny"]  # width read back from the file
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 19, 64, 96)


@pytest.mark.parametrize("position", [0, 1, 7, 49, 4999])
def test_positional_encoding_matches_the_vaswani_formula(position):
    d_model = 384
    pe = PositionalEncoding(d_model=d_model, max_len=5000)
    # The table is built in fp32 like the official one: the angle's rounding error grows with the
    # position (~3e-4 at 5000). Inference only uses positions < 50, where it is exact to 1e-6.
    tolerance = 1e-6 if position < 50 else 1e-3
    for i in (0, 1, 95, 191):
        angle = position * math.exp(-2 * i * math.log(10000.0) / d_model)
        assert pe.pe[0, position, 2 * i].item() == pytest.approx(math.sin(angle), abs=tolerance)
        assert pe.pe[0, position, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=tolerance)


def test_positional_encoding_adds_the_first_t_rows():
    pe = PositionalEncoding(d_model=8, max_len=100)
    x = torch.randn(2, 50, 8)
    assert torch.equal(pe(x), x + pe.pe[:, :50])
    assert "pe" not in pe.state_dict()  # computed, never loaded


def test_vae_with_pre_0_14_diffusers_attention_names_loads_the_same(tiny_models_dir, tmp_path):
    # The official sd-vae file was written by diffusers 0.4.2 (query/key/value/proj_attn).
    shutil.copytree(tiny_models_dir / "sd-vae", tmp_path / "sd-vae")
    weights = weight_file("vae").path(tmp_path)
    current = load_state_dict(weights)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, tensor in current.items():
        if ".mid_block.attentions." in key:
            for new, old in legacy_names.items():
                key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = tensor
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    torch.save(legacy, weights)

    loaded = load_vae(tmp_path).state_dict()
    assert loaded.keys() == current.keys()
    assert all(torch.equal(loaded[k], current[k]) for k in current)
