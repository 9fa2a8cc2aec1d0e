"""S3FD: checkpoint layout, loading, and the detection post-processing on hand-made outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from musetalk_service.nets import s3fd
from musetalk_service.nets.loading import WeightsFileError

# Read from face-alignment's detection/sfd/net_s3fd.py, whose state dict is s3fd-619a316812.pth.
PUBLIC_SHAPES = {
    "conv1_1.weight": (64, 3, 3, 3),
    "conv3_3.bias": (256,),
    "conv5_3.weight": (512, 512, 3, 3),
    "fc6.weight": (1024, 512, 3, 3),
    "fc7.weight": (1024, 1024, 1, 1),
    "conv6_1.weight": (256, 1024, 1, 1),
    "conv6_2.weight": (512, 256, 3, 3),
    "conv7_1.weight": (128, 512, 1, 1),
    "conv7_2.weight": (256, 128, 3, 3),
    "conv3_3_norm.weight": (256,),
    "conv4_3_norm.weight": (512,),
    "conv5_3_norm.weight": (512,),
    "conv3_3_norm_mbox_conf.weight": (4, 256, 3, 3),
    "conv3_3_norm_mbox_loc.weight": (4, 256, 3, 3),
    "conv4_3_norm_mbox_conf.weight": (2, 512, 3, 3),
    "fc7_mbox_conf.weight": (2, 1024, 3, 3),
    "fc7_mbox_loc.bias": (4,),
    "conv7_2_mbox_conf.weight": (2, 256, 3, 3),
}
PUBLIC_KEY_COUNT = 65  # 31 convs x (weight, bias) + 3 L2Norm weights
STRIDES = (4, 8, 16, 32, 64, 128)


@pytest.fixture
def tiny() -> s3fd.S3FD:
    torch.manual_seed(0)
    return s3fd.build("tiny")


def test_full_size_has_the_spec_parameter_count():
    with torch.device("meta"):
        model = s3fd.build("full")
    assert sum(p.numel() for p in model.parameters()) == 22_459_110  # spec §1/§10: 22.46 M


def test_full_state_dict_matches_the_public_checkpoint_layout():
    with torch.device("meta"):
        state = s3fd.build("full").state_dict()
    assert len(state) == PUBLIC_KEY_COUNT
    for key, shape in PUBLIC_SHAPES.items():
        assert tuple(state[key].shape) == shape, key


def test_l2norm_scales_start_at_the_reference_values():
    model = s3fd.build("tiny")
    assert model.conv3_3_norm.weight.unique().tolist() == [10.0]
    assert model.conv4_3_norm.weight.unique().tolist() == [8.0]
    assert model.conv5_3_norm.weight.unique().tolist() == [5.0]


def test_first_head_max_pools_three_background_logits(tiny):
    raw = []
    tiny.conv3_3_norm_mbox_conf.register_forward_hook(lambda module, args, out: raw.append(out))
    with torch.no_grad():
        nn.init.normal_(tiny.conv3_3_norm_mbox_conf.weight)
        conf, _ = tiny(torch.randn(1, 3, 64, 64))[0]
    assert raw[0].shape[1] == 4 and conf.shape[1] == 2
    torch.testing.assert_close(conf[:, 0], raw[0][:, :3].amax(dim=1))
    torch.testing.assert_close(conf[:, 1], raw[0][:, 3])


def test_detection_heads_see_the_vgg_features_as_the_layers_compute_them(tiny):
    """The forward overwrites activations in place to save memory; the features each head reads
    must still be the plain layer-by-layer ones (face-alignment's net_s3fd.py order)."""
    seen = {}
    for name in ("conv3_3_norm", "conv4_3_norm", "conv5_3_norm", "fc7_mbox_conf"):
        tiny.get_submodule(name).register_forward_hook(lambda module, args, out, name=name: seen.setdefault(name, args[0].clone()))
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        tiny(x)
        h, expected = x, {}
        for stage in (("conv1_1", "conv1_2"), ("conv2_1", "conv2_2"), ("conv3_1", "conv3_2", "conv3_3"),
                      ("conv4_1", "conv4_2", "conv4_3"), ("conv5_1", "conv5_2", "conv5_3")):  # fmt: skip
            for name in stage:
                h = torch.relu(tiny.get_submodule(name)(h))
            if stage[-1] in ("conv3_3", "conv4_3", "conv5_3"):
                expected[f"{stage[-1]}_norm"] = h
            h = torch.max_pool2d(h, 2, 2)
        expected["fc7_mbox_conf"] = torch.relu(tiny.fc7(torch.relu(tiny.fc6(h))))
    assert set(seen) == set(expected)
    for name, features in expected.items():
        torch.testing.assert_close(seen[name], features, msg=name)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_tiny_weights_load_back_with_the_width_inferred(tiny, tmp_path, suffix):
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / f"s3fd{suffix}"
    if suffix == ".safetensors":
        save_file(tiny.state_dict(), path)
    else:
        torch.save(tiny.state_dict(), path)
    loaded = s3fd.load(path, "cpu")
    assert loaded.width == s3fd.WIDTHS["tiny"] and not loaded.training
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for (c1, l1), (c2, l2) in zip(tiny(x), loaded(x)):
            torch.testing.assert_close(c1, c2)
            torch.testing.assert_close(l1, l2)


def test_load_names_the_file_when_it_is_not_s3fd(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(WeightsFileError, match="other.pth"):
        s3fd.load(path)
    state = s3fd.build("tiny").state_dict()
    del state["fc7_mbox_loc.bias"]
    torch.save(state, path)
    with pytest.raises(WeightsFileError, match="fc7_mbox_loc.bias"):
        s3fd.load(path)


def _background_outputs(batch: int, height: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Head outputs for an input of height x width where every anchor is confidently background."""
    outputs = []
    for stride in STRIDES:
        h, w = math.ceil(height / stride), math.ceil(width / stride)
        conf = torch.zeros(batch, 2, h, w)
        conf[:, 0] = 10.0
        outputs.append((conf, torch.zeros(batch, 4, h, w)))
    return outputs


def _encode(outputs, image: int, level: int, row: int, col: int, box, face_logit: float = 5.0) -> float:
    """Write `box` (x1,y1,x2,y2) as the regression of one anchor and make it a face; returns its probability."""
    stride = STRIDES[level]
    size = 4 * stride
    acx, acy = stride / 2 + col * stride, stride / 2 + row * stride
    x1, y1, x2, y2 = box
    conf, loc = outputs[level]
    loc[image, :, row, col] = torch.tensor(
        [
            ((x1 + x2) / 2 - acx) / (0.1 * size),
            ((y1 + y2) / 2 - acy) / (0.1 * size),
            math.log((x2 - x1) / size) / 0.2,
            math.log((y2 - y1) / size) / 0.2,
        ]
    )
    conf[image, :, row, col] = torch.tensor([0.0, face_logit])
    return 1 / (1 + math.exp(-face_logit))


@pytest.mark.parametrize(("level", "row", "col"), [(0, 20, 30), (2, 5, 7), (3, 2, 4), (5, 1, 1)])
def test_decode_recovers_a_box_encoded_at_a_known_anchor(level, row, col):
    outputs = _background_outputs(1, 256, 320)
    box = (101.5, 60.25, 181.0, 170.75)
    prob = _encode(outputs, 0, level, row, col, box)
    (found,) = s3fd.decode_detections(outputs)
    assert found.shape == (1, 5) and found.dtype == np.float32
    np.testing.assert_allclose(found[0, :4], box, atol=1e-3)
    assert found[0, 4] == pytest.approx(prob, abs=1e-6)


def test_decode_maps_boxes_back_through_scale_xy():
    outputs = _background_outputs(1, 128, 160)
    _encode(outputs, 0, 1, 6, 8, (40.0, 30.0, 100.0, 110.0))
    (found,) = s3fd.decode_detections(outputs, scale_xy=(0.5, 0.25))
    np.testing.assert_allclose(found[0, :4], (80.0, 120.0, 200.0, 440.0), atol=1e-3)


def test_decode_keeps_images_apart_sorts_by_score_and_applies_thresholds():
    outputs = _background_outputs(2, 256, 256)
    _encode(outputs, 0, 2, 3, 3, (20.0, 20.0, 80.0, 80.0), face_logit=1.0)  # p = 0.73
    _encode(outputs, 0, 3, 4, 4, (140.0, 140.0, 220.0, 230.0), face_logit=4.0)  # p = 0.98
    _encode(outputs, 0, 1, 10, 25, (180.0, 60.0, 230.0, 110.0), face_logit=-1.0)  # p = 0.27
    _encode(outputs, 1, 4, 1, 2, (100.0, 50.0, 200.0, 150.0))
    first, second = s3fd.decode_detections(outputs)
    np.testing.assert_allclose(first[:, :4], [(140, 140, 220, 230), (20, 20, 80, 80)], atol=1e-3)
    assert first[0, 4] > first[1, 4]
    np.testing.assert_allclose(second[:, :4], [(100, 50, 200, 150)], atol=1e-3)
    assert len(s3fd.decode_detections(outputs, score_threshold=0.2)[0]) == 3
    # A candidate threshold above the score threshold is the stricter of the two, as in the reference.
    assert len(s3fd.decode_detections(outputs, score_threshold=0.2, candidate_threshold=0.9)[0]) == 1


def test_decode_with_no_candidates_gives_empty_arrays():
    results = s3fd.decode_detections(_background_outputs(3, 64, 64))
    assert [r.shape for r in results] == [(0, 5)] * 3


def test_nms_suppresses_overlaps_above_the_threshold_and_keeps_the_rest():
    boxes = np.array(
        [
            [0, 0, 100, 100, 0.9],
            [10, 10, 110, 110, 0.8],  # IoU 0.68 with the first (areas with +1): dropped
            [200, 200, 300, 300, 0.7],  # disjoint: kept
            [0, 60, 100, 160, 0.6],  # IoU 0.25 with the first: kept
            [205, 195, 305, 295, 0.95],  # best overall; IoU 0.82 with the third, which goes
        ],
        dtype=np.float64,
    )
    assert s3fd.nms(boxes, 0.3).tolist() == [4, 0, 3]
    assert s3fd.nms(boxes, 0.7).tolist() == [4, 0, 1, 3]
    assert s3fd.nms(boxes[:0], 0.3).tolist() == []


class _FakeDetector(nn.Module):
    """Stands in for S3FD: records its input and reports one face at a fixed place in network pixels."""

    box = (40.0, 20.0, 104.0, 84.0)

    def __init__(self):
        super().__init__()
        self.anchor_weight = nn.Parameter(torch.zeros(1))
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor):
        self.seen = x
        outputs = _background_outputs(x.shape[0], *x.shape[-2:])
        for image in range(x.shape[0]):
            _encode(outputs, image, 2, 3, 4, self.box)
        return outputs


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_detect_faces_preprocesses_and_maps_scaled_boxes_to_frame_pixels(scale):
    frames = np.zeros((2, 200, 300, 3), np.uint8)
    frames[...] = (10, 20, 30)  # BGR
    model = _FakeDetector()
    found = s3fd.detect_faces(model, frames, scale=scale)
    assert model.seen.shape == (2, 3, round(200 * scale), round(300 * scale))
    # RGB order, minus (104, 117, 123); a flat frame stays flat through the antialiased resize.
    expected = torch.tensor([30 - 104, 20 - 117, 10 - 123], dtype=torch.float32).view(1, 3, 1, 1)
    torch.testing.assert_close(model.seen, expected.expand_as(model.seen))
    for boxes in found:
        np.testing.assert_allclose(boxes[:, :4], [np.array(_FakeDetector.box) / scale], rtol=1e-5)


def test_detect_faces_batch_equals_one_frame_at_a_time(tiny):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 96, 128, 3), dtype=np.uint8)
    batched = s3fd.detect_faces(tiny, frames)
    assert sum(len(b) for b in batched) > 0  # random weights still pass the 0.5 threshold somewhere
    for frame, boxes in zip(frames, batched):
        (alone,) = s3fd.detect_faces(tiny, frame[None])
        np.testing.assert_allclose(alone, boxes, atol=1e-3)


def test_detect_faces_checks_its_input(tiny):
    assert s3fd.detect_faces(tiny, np.zeros((0, 64, 64, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        s3fd.detect_faces(tiny, np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="scale"):
        s3fd.detect_faces(tiny, np.zeros((1, 64, 64, 3), np.uint8), scale=0)


def test_capping_nms_input_keeps_exactly_the_reference_boxes_among_the_best():
    rng = np.random.default_rng(0)
    outputs = _background_outputs(1, 256, 256)
    conf, loc = outputs[0]  # 64 x 64 stride-4 anchors, all above the threshold
    conf[0, 1] = torch.from_numpy(rng.uniform(10.1, 12.0, (64, 64))).float()  # p in (0.52, 0.88)
    loc[0] = torch.from_numpy(rng.normal(0.0, 3.0, (4, 64, 64))).float()
    (capped,) = s3fd.decode_detections(outputs)
    candidates = _all_candidates(outputs)
    reference = candidates[s3fd.nms(candidates, 0.3)]
    cutoff = np.sort(candidates[:, 4])[-s3fd._MAX_NMS_INPUT]
    assert 0 < len(capped) < len(reference)
    np.testing.assert_allclose(capped, reference[reference[:, 4] >= cutoff], atol=1e-3)


def _all_candidates(outputs) -> np.ndarray:
    """Every stride-4 anchor of image 0 decoded, uncapped (the reference's candidate list)."""
    conf, loc = outputs[0]
    prob = torch.softmax(conf[0], dim=0)[1].reshape(-1).numpy()
    offsets = loc[0].reshape(4, -1).numpy().astype(np.float64)
    y, x = np.divmod(np.arange(prob.size), conf.shape[-1])
    cx = 2 + 4 * x + offsets[0] * 0.1 * 16
    cy = 2 + 4 * y + offsets[1] * 0.1 * 16
    w, h = 16 * np.exp(offsets[2] * 0.2), 16 * np.exp(offsets[3] * 0.2)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, prob], axis=1)


@pytest.mark.parametrize("height, width", [(1, 1), (7, 100), (31, 31), (100, 16)])
def test_frames_smaller_than_the_pooling_needs_are_padded_not_a_crash(tiny, height, width):
    frames = np.full((2, height, width, 3), 128, np.uint8)
    found = s3fd.detect_faces(tiny, frames, score_threshold=0.0)
    assert len(found) == 2 and all(boxes.ndim == 2 and boxes.shape[1] == 5 for boxes in found)
