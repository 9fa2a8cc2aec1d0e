"""Random weights -> check -> load, malformed and missing files, the weights kind, and the Haar mode
without the S3FD and FAN files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from musetalk_service.errors import WeightsError
from musetalk_service.nets.bundle import ModelBundle
from musetalk_service.nets.check import check_weights, weights_kind
from musetalk_service.nets.layout import FACE_NET_KEYS, PROVENANCE_FILE, WEIGHT_FILES, weight_file
from musetalk_service.nets.loading import load_state_dict
from musetalk_service.nets.random_weights import write_random_weights
from musetalk_service.nets.unet import build_unet


FACE_NET_FILES = ("face-detection/s3fd.pth", "face-detection/2DFAN4.pth")


@pytest.fixture
def models_copy(tiny_models_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny weights, free to damage."""
    return Path(shutil.copytree(tiny_models_dir, tmp_path / "models"))


@pytest.fixture
def models_without_face_nets(models_copy: Path) -> Path:
    """The tiny weights without S3FD and 2DFAN4: what a machine that cannot fetch those two holds."""
    for key in FACE_NET_KEYS:
        weight_file(key).path(models_copy).unlink()
    return models_copy


def test_random_weights_fill_the_whole_layout_and_check_clean(tiny_models_dir):
    report = check_weights(tiny_models_dir)
    assert report.ok, report.summary()
    assert [f.relpath for f in report.files] == [f.relpath for f in WEIGHT_FILES]
    assert report.kind == "random"
    provenance = json.loads((tiny_models_dir / PROVENANCE_FILE).read_text())
    assert provenance == {"kind": "random", "size": "tiny", "seed": 0}


def test_random_weights_are_plain_state_dicts_and_official_configs(tiny_models_dir):
    unet_state = torch.load(weight_file("unet").path(tiny_models_dir), weights_only=True)
    assert isinstance(unet_state, dict) and "conv_in.weight" in unet_state
    whisper_state = torch.load(weight_file("whisper").path(tiny_models_dir), weights_only=True)
    assert any(k.startswith("model.encoder.") for k in whisper_state)  # as openai/whisper-tiny's file
    unet_config = json.loads(weight_file("unet_config").path(tiny_models_dir).read_text())
    assert unet_config["_class_name"] == "UNet2DConditionModel" and unet_config["in_channels"] == 8
    preprocessor = json.loads(weight_file("whisper_preprocessor").path(tiny_models_dir).read_text())
    assert preprocessor["feature_extractor_type"] == "WhisperFeatureExtractor"
    assert preprocessor["sampling_rate"] == 16000 and preprocessor["feature_size"] == 80


def test_same_seed_same_weights_and_the_callers_rng_is_untouched(tiny_models_dir, tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    write_random_weights(tmp_path, size="tiny", seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    for key in ("unet", "face_parser", "landmarker"):
        a = load_state_dict(weight_file(key).path(tmp_path))
        b = load_state_dict(weight_file(key).path(tiny_models_dir))
        assert all(torch.equal(a[k], b[k]) for k in a), key


def test_tiny_bundle_contract(tiny_bundle):
    assert tiny_bundle.device == torch.device("cpu") and tiny_bundle.dtype == torch.float32
    assert tiny_bundle.weights_kind == "random"
    assert tiny_bundle.token_count == 50  # 10 steps x (embeddings + 4 encoder layers), as whisper-tiny
    assert tiny_bundle.audio_dim == tiny_bundle.unet.config.cross_attention_dim == 64
    nets = [tiny_bundle.vae, tiny_bundle.unet, tiny_bundle.pe, tiny_bundle.whisper,
            tiny_bundle.face_parser, tiny_bundle.face_detector, tiny_bundle.landmarker]
    for net in nets:
        assert not net.training
        assert not any(p.requires_grad for p in net.parameters())
        assert all(t.dtype == torch.float32 for t in (*net.parameters(), *net.buffers()) if t.is_floating_point())
    assert not hasattr(tiny_bundle.whisper, "decoder")


def test_tiny_bundle_runs_the_pipeline_shapes(tiny_bundle):
    b = tiny_bundle
    with torch.inference_mode():
        mel = torch.zeros(1, 80, 3000)
        hidden = b.whisper(mel, output_hidden_states=True).hidden_states
        assert len(hidden) * 10 == b.token_count and hidden[0].shape == (1, 1500, b.audio_dim)
        latents = b.vae.encode(torch.zeros(2, 3, 256, 256)).latent_dist.mode()
        assert latents.shape == (2, 4, 32, 32)  # 8x downsampling kept in the tiny VAE
        audio = b.pe(torch.zeros(2, b.token_count, b.audio_dim))
        out = b.unet(torch.cat([latents, latents], dim=1), 0, encoder_hidden_states=audio).sample
        assert out.shape == (2, 4, 32, 32)
        assert b.vae.decode(out).sample.shape == (2, 3, 256, 256)
        assert b.face_parser(torch.zeros(1, 3, 512, 512)).shape == (1, 19, 512, 512)


def test_warmup_runs_every_network(tiny_bundle):
    tiny_bundle.warmup()  # raises if any network rejects the pipeline's shapes


def test_safetensors_files_load_the_same_tensors(models_copy, tiny_bundle):
    for entry in WEIGHT_FILES:
        if not entry.alternates:
            continue
        path = entry.path(models_copy)
        # clone: whisper ties proj_out to the token embedding, and safetensors refuses shared storage.
        state = {k: v.clone() for k, v in load_state_dict(path).items()}
        save_file(state, str(path.with_name(entry.alternates[0])))
        path.unlink()
    assert check_weights(models_copy).ok
    bundle = ModelBundle.load(models_copy, "cpu")
    for name in ("unet", "vae", "whisper", "face_parser", "face_detector", "landmarker"):
        loaded, reference = getattr(bundle, name).state_dict(), getattr(tiny_bundle, name).state_dict()
        assert loaded.keys() == reference.keys(), name
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), name


def test_truncated_file_is_reported_malformed(models_copy):
    path = weight_file("unet").path(models_copy)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    report = check_weights(models_copy)
    unet = report.file("musetalkV15/unet.pth")
    assert unet.status == "malformed" and "unreadable" in unet.reason
    assert [f.relpath for f in report.malformed] == ["musetalkV15/unet.pth"]
    assert "musetalkV15/unet.pth" in report.summary()
    with pytest.raises(WeightsError, match=r"unet\.pth.*unreadable.*weights download --dir"):
        ModelBundle.load(models_copy, "cpu")


@pytest.mark.parametrize(
    ("key", "tensor"),
    [
        ("face_parser", "cp.arm16.conv_atten.weight"),
        ("vae", "decoder.conv_out.weight"),
        ("whisper", "model.encoder.conv1.weight"),
    ],
)
def test_wrong_shape_is_reported_malformed_with_the_tensor(models_copy, key, tensor):
    path = weight_file(key).path(models_copy)
    state = load_state_dict(path)
    state[tensor] = torch.zeros(3, 3)
    torch.save(state, path)
    report = check_weights(models_copy).file(weight_file(key).relpath)
    assert report.status == "malformed"
    assert tensor.removeprefix("model.encoder.") in report.reason and "wrong shape" in report.reason


def test_a_config_that_does_not_match_its_weights_blames_the_weights(models_copy):
    config_path = weight_file("unet_config").path(models_copy)
    config = json.loads(config_path.read_text())
    config["layers_per_block"] = 2
    config_path.write_text(json.dumps(config))
    report = check_weights(models_copy)
    assert report.file("musetalkV15/unet.pth").status == "malformed"
    assert "missing tensors" in report.file("musetalkV15/unet.pth").reason


def test_an_invalid_config_is_reported_malformed(models_copy):
    weight_file("vae_config").path(models_copy).write_text('{"down_block_types": ["NoSuchBlock"]}')
    report = check_weights(models_copy).file("sd-vae/config.json")
    assert report.status == "malformed" and "AutoencoderKL" in report.reason


def test_missing_file_is_reported_and_load_names_it_and_the_command(models_copy):
    weight_file("vae").path(models_copy).unlink()
    report = check_weights(models_copy)
    assert [f.relpath for f in report.missing] == ["sd-vae/diffusion_pytorch_model.bin"]
    assert not report.ok
    with pytest.raises(WeightsError) as info:
        ModelBundle.load(models_copy, "cpu")
    message = str(info.value)
    assert "sd-vae/diffusion_pytorch_model.bin" in message
    assert f"musetalk-service weights download --dir {models_copy}" in message
    assert "musetalk-service weights random" in message


def test_unet_and_whisper_of_different_widths_are_refused(models_copy):
    config_path = weight_file("unet_config").path(models_copy)
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 32
    config_path.write_text(json.dumps(config))
    torch.save(build_unet(config).state_dict(), weight_file("unet").path(models_copy))
    with pytest.raises(WeightsError, match="cross_attention_dim 32 .* d_model 64"):
        ModelBundle.load(models_copy, "cpu")


def test_weights_kind_transitions(models_copy):
    assert weights_kind(models_copy) == "random"
    provenance = models_copy / PROVENANCE_FILE
    files = {f.relpath: {"size": f.path(models_copy).stat().st_size} for f in WEIGHT_FILES}
    provenance.write_text(json.dumps({"kind": "official", "files": files}))
    assert weights_kind(models_copy) == "official"
    with open(weight_file("face_parser").path(models_copy), "ab") as f:
        f.write(b"\0")  # a changed file: no longer what was downloaded
    assert weights_kind(models_copy) == "custom"
    provenance.unlink()
    assert weights_kind(models_copy) == "custom"
    provenance.write_text("{broken")
    assert weights_kind(models_copy) == "custom"


def test_s3fd_mode_without_the_face_nets_names_them(models_without_face_nets):
    with pytest.raises(WeightsError) as info:
        ModelBundle.load(models_without_face_nets, "cpu")
    message = str(info.value)
    assert all(relpath in message for relpath in FACE_NET_FILES), message
    assert f"musetalk-service weights download --dir {models_without_face_nets}" in message
    assert "needed only with face.detector: s3fd" in message  # the way out for a machine without them
    report = check_weights(models_without_face_nets)
    assert not report.ok and [f.relpath for f in report.missing] == list(FACE_NET_FILES)


def test_haar_mode_loads_and_warms_up_without_the_face_nets(models_without_face_nets):
    bundle = ModelBundle.load(models_without_face_nets, "cpu", detector="haar")

    assert bundle.face_detector is None and bundle.landmarker is None
    assert bundle.weights_kind == "random"
    bundle.warmup()
    report = check_weights(models_without_face_nets, "haar")
    assert report.ok, report.summary()
    assert [f.relpath for f in report.files] == [f.relpath for f in WEIGHT_FILES if f.relpath not in FACE_NET_FILES]
    assert report.not_needed == FACE_NET_FILES
    assert "not checked" in report.summary() and FACE_NET_FILES[1] in report.summary()


def test_haar_mode_never_reads_the_face_net_files(models_copy):
    for key in FACE_NET_KEYS:
        path = weight_file(key).path(models_copy)
        path.write_bytes(path.read_bytes()[:100])

    assert ModelBundle.load(models_copy, "cpu", detector="haar").face_detector is None
    assert check_weights(models_copy, "haar").ok
    assert [f.relpath for f in check_weights(models_copy).malformed] == list(FACE_NET_FILES)


def test_official_kind_in_haar_mode_does_not_count_the_face_nets(models_without_face_nets, tiny_models_dir):
    provenance = models_without_face_nets / PROVENANCE_FILE
    files = {f.relpath: {"size": f.path(tiny_models_dir).stat().st_size} for f in WEIGHT_FILES}
    # A full official download whose S3FD and FAN files are gone since: Haar never loads them.
    provenance.write_text(json.dumps({"kind": "official", "files": files}))
    assert weights_kind(models_without_face_nets, "haar") == "official"
    assert weights_kind(models_without_face_nets) == "custom"
    # What `weights download` records in Haar mode: the files it fetched, without S3FD and FAN.
    fetched = {relpath: meta for relpath, meta in files.items() if relpath not in FACE_NET_FILES}
    provenance.write_text(json.dumps({"kind": "official", "files": fetched}))
    assert weights_kind(models_without_face_nets, "haar") == "official"
    # A changed file that Haar mode does load still makes the weights custom.
    with open(weight_file("unet").path(models_without_face_nets), "ab") as f:
        f.write(b"\0")
    assert weights_kind(models_without_face_nets, "haar") == "custom"
