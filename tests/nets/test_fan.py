"""FAN: 2DFAN4 layout, loading (state dict and TorchScript), crop geometry and heatmap decoding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from musetalk_service.nets import fan
from musetalk_service.nets.loading import WeightsFileError

# Read from face-alignment's models/fan.py, whose state dict is 2DFAN4-11f355bf06.pth.tar.
PUBLIC_SHAPES = {
    "conv1.weight": (64, 3, 7, 7),
    "conv1.bias": (64,),
    "bn1.running_var": (64,),
    "conv2.bn1.weight": (64,),
    "conv2.conv1.weight": (64, 64, 3, 3),
    "conv2.downsample.0.running_mean": (64,),
    "conv2.downsample.2.weight": (128, 64, 1, 1),
    "conv3.conv3.weight": (32, 32, 3, 3),
    "conv4.downsample.2.weight": (256, 128, 1, 1),
    "m0.b1_4.conv1.weight": (128, 256, 3, 3),
    "m0.b2_plus_1.conv3.weight": (64, 64, 3, 3),
    "m3.b3_1.bn3.num_batches_tracked": (),
    "top_m_3.conv2.weight": (64, 128, 3, 3),
    "conv_last0.weight": (256, 256, 1, 1),
    "bn_end2.bias": (256,),
    "l3.weight": (68, 256, 1, 1),
    "bl2.weight": (256, 256, 1, 1),
    "al2.weight": (256, 68, 1, 1),
}
PUBLIC_KEY_COUNT = 1129  # 831 parameters + 3 x 166 BatchNorm buffers


def _convblock_params(cin: int, cout: int) -> int:
    convs = cin * cout // 2 * 9 + cout // 2 * cout // 4 * 9 + (cout // 4) ** 2 * 9
    batchnorms = 2 * (cin + cout // 2 + cout // 4)
    downsample = 2 * cin + cin * cout if cin != cout else 0
    return convs + batchnorms + downsample


def _2dfan4_params() -> int:
    """2DFAN4's parameter count from the architecture's arithmetic, independent of the module code."""
    stem = (3 * 64 * 49 + 64) + 2 * 64 + _convblock_params(64, 128) + _convblock_params(128, 128)
    stem += _convblock_params(128, 256)
    hourglass = 13 * _convblock_params(256, 256)  # 3 blocks on each of 4 levels + the innermost one
    stack = hourglass + _convblock_params(256, 256) + (256 * 256 + 256) + 2 * 256 + (256 * 68 + 68)
    between_stacks = (256 * 256 + 256) + (68 * 256 + 256)
    return stem + 4 * stack + 3 * between_stacks


@pytest.fixture
def tiny() -> fan.FAN:
    torch.manual_seed(0)
    model = fan.build("tiny")
    _randomise_batchnorm(model)
    return model


def _randomise_batchnorm(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)


def test_full_size_has_the_2dfan4_parameter_count():
    with torch.device("meta"):
        model = fan.build("full")
    assert sum(p.numel() for p in model.parameters()) == _2dfan4_params() == 23_820_176


def test_full_state_dict_matches_the_public_checkpoint_layout():
    with torch.device("meta"):
        state = fan.build("full").state_dict()
    assert len(state) == PUBLIC_KEY_COUNT
    for key, shape in PUBLIC_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert "conv3.downsample.0.weight" not in state  # same width in and out: no projection
    assert not any(k.startswith(("bl3.", "al3.")) for k in state)  # the last stack feeds nothing


def test_forward_gives_64x64_heatmaps_per_landmark(tiny):
    with torch.no_grad():
        out = tiny(torch.rand(2, 3, 256, 256))
    assert out.shape == (2, 68, 64, 64)


@pytest.mark.parametrize(("num_modules", "width"), [(1, 16), (2, 24)])
def test_weights_load_back_with_stacks_and_width_inferred(tmp_path, num_modules, width):
    model = fan.FAN(num_modules, width).eval()
    _randomise_batchnorm(model)
    path = tmp_path / "2DFAN4.pth"
    torch.save(model.state_dict(), path)
    loaded = fan.load(path, "cpu")
    assert (loaded.num_modules, loaded.width, loaded.training) == (num_modules, width, False)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# torch 2.13 deprecates torch.jit; the published 2DFAN4 archive still needs it to be read.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_torchscript_archive_loads_its_weights(tiny, tmp_path):
    x = torch.rand(1, 3, 256, 256)
    path = tmp_path / "2DFAN4.zip"
    torch.jit.trace(tiny, x, check_trace=False).save(str(path))
    loaded = fan.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tiny(x))


def test_a_checkpoint_from_before_num_batches_tracked_loads(tiny, tmp_path):
    path = tmp_path / "old.pth.tar"
    torch.save({k: v for k, v in tiny.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    assert isinstance(fan.load(path), fan.FAN)


def test_load_names_the_file_when_it_is_not_a_fan(tmp_path):
    path = tmp_path / "s3fd.pth"
    torch.save({"conv1_1.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(WeightsFileError, match="s3fd.pth"):
        fan.load(path)


def _box_geometry(box):
    """face-alignment's centre and crop side for a box, written out from its api.py."""
    x1, y1, x2, y2 = box
    center = np.array([x2 - (x2 - x1) / 2, y2 - (y2 - y1) / 2 - 0.12 * (y2 - y1)])
    return center, 200 * (x2 - x1 + y2 - y1) / 195


def test_heatmap_peaks_map_to_frame_coordinates():
    box = np.array([100.0, 200.0, 300.0, 420.0])
    center, side = _box_geometry(box)
    heatmaps = torch.zeros(1, 68, 64, 64)
    heatmaps[0, 0, 20, 40] = 1.0  # a lone peak: no refinement
    heatmaps[0, 1, 10, 10] = 1.0
    heatmaps[0, 1, 10, 11] = 0.5  # right neighbour higher: +1/4 cell in x
    heatmaps[0, 1, 9, 10] = 0.5  # upper neighbour higher: -1/4 cell in y
    heatmaps[0, 2, 30, 0] = 1.0  # on the border: no refinement
    heatmaps[0, 2, 30, 1] = 0.5
    heatmaps[0, 3:, 32, 32] = 1.0
    landmarks = fan.heatmaps_to_landmarks(heatmaps, box[None])
    assert landmarks.shape == (1, 68, 2) and landmarks.dtype == np.float32
    cells = {0: (40.5, 20.5), 1: (10.75, 10.25), 2: (0.5, 30.5), 3: (32.5, 32.5)}
    for point, cell in cells.items():
        expected = center + (np.array(cell) - 32) * side / 64
        np.testing.assert_allclose(landmarks[0, point], expected, rtol=1e-6)


def _reference_crop(image: np.ndarray, center: np.ndarray, side: float) -> np.ndarray:
    """face-alignment's crop: the integer pixel span [ul, br) around the centre, zero padded, resized to 256."""
    ul = (center + (1 - 128) * side / 256).astype(int)
    br = (center + 128 * side / 256).astype(int)
    canvas = np.zeros((br[1] - ul[1], br[0] - ul[0], 3), np.uint8)
    src_x0, src_y0 = max(ul[0], 0), max(ul[1], 0)
    src_x1, src_y1 = min(br[0], image.shape[1]), min(br[1], image.shape[0])
    canvas[src_y0 - ul[1] : src_y1 - ul[1], src_x0 - ul[0] : src_x1 - ul[0]] = image[src_y0:src_y1, src_x0:src_x1]
    return cv2.resize(canvas, (256, 256), interpolation=cv2.INTER_LINEAR)


@pytest.mark.parametrize(
    "box",
    [(200.0, 100.0, 400.0, 330.0), (250.3, 140.7, 330.9, 229.2), (-30.0, -20.0, 120.0, 150.0)],
    ids=["inside", "subpixel", "past-the-corner"],
)
def test_crops_follow_face_alignments_crop_convention(box):
    yy, xx = np.mgrid[0:480, 0:640]
    smooth = np.stack([128 + 100 * np.sin(xx / 23) * np.cos(yy / 17), xx * 255 / 640, yy * 255 / 480], -1)
    frame = smooth.astype(np.uint8)
    (crop,) = fan.crop_faces(frame[None], np.array([box]), np.array([0]))
    reference = _reference_crop(frame, *_box_geometry(box))
    # They differ only by the reference's rounding of the span to whole pixels.
    assert np.abs(crop.astype(float) - reference).mean() < 1.0


@pytest.mark.parametrize("shift", [0.0, 0.37, 0.5, 0.999])
def test_crops_read_only_the_pixels_their_samples_touch(shift):
    """Each crop warps just the frame region under its samples (so frames kept elsewhere send
    back only that): on noise, the very crop a warp of the whole frame gives, at every edge."""
    frames = np.random.default_rng(3).integers(0, 256, (1, 240, 320, 3), dtype=np.uint8)
    boxes = np.array([(100, 60, 220, 200), (-40, -30, 90, 110), (250, 150, 400, 300), (17, 190, 77, 260)]) + shift
    crops = fan.crop_faces(frames, boxes, np.zeros(len(boxes), int))
    for crop, box in zip(crops, boxes):
        (cx, cy), side = _box_geometry(box)
        step = side * 255 / 256**2
        first = -127 * side / 256 + step / 2 - 0.5
        to_frame = np.array([[step, 0.0, cx + first], [0.0, step, cy + first]])
        whole = cv2.warpAffine(frames[0], to_frame, (256, 256), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        assert np.array_equal(crop, whole)


class _FakeLandmarker(nn.Module):
    """Stands in for FAN: records its input and puts every landmark's peak in one heatmap cell."""

    def __init__(self, cell=(40, 20)):
        super().__init__()
        self.anchor_weight = nn.Parameter(torch.zeros(1))
        self.cell = cell
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        heatmaps = torch.zeros(x.shape[0], 68, 64, 64)
        heatmaps[:, :, self.cell[1], self.cell[0]] = 1.0
        return heatmaps


def test_predict_landmarks_feeds_rgb_crops_and_maps_peaks_back():
    frames = np.zeros((2, 300, 400, 3), np.uint8)
    frames[1, 50:250, 100:300] = (10, 20, 30)  # BGR, covering the whole crop of the box below
    boxes = np.array([[160.0, 110.0, 240.0, 190.0]])
    model = _FakeLandmarker()
    landmarks = fan.predict_landmarks(model, frames, boxes, np.array([1]))
    expected_input = torch.tensor([30, 20, 10], dtype=torch.float32).view(1, 3, 1, 1) / 255
    torch.testing.assert_close(model.seen, expected_input.expand(1, 3, 256, 256))
    center, side = _box_geometry(boxes[0])
    np.testing.assert_allclose(landmarks[0], np.tile(center + (np.array([40.5, 20.5]) - 32) * side / 64, (68, 1)))


def test_predict_landmarks_batch_equals_one_face_at_a_time(tiny):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 240, 320, 3), dtype=np.uint8)
    boxes = np.array([[100.0, 50.0, 200.0, 180.0], [10.0, 10.0, 80.0, 90.0], [150.5, 60.25, 300.0, 230.0]])
    frame_index = np.array([0, 0, 1])
    batched = fan.predict_landmarks(tiny, frames, boxes, frame_index)
    assert batched.shape == (3, 68, 2)
    for box, index, landmarks in zip(boxes, frame_index, batched):
        alone = fan.predict_landmarks(tiny, frames, box[None], np.array([index]))
        np.testing.assert_allclose(alone[0], landmarks, atol=1e-3)


def test_predict_landmarks_checks_its_input(tiny):
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    assert fan.predict_landmarks(tiny, frames, np.zeros((0, 4)), np.zeros(0)).shape == (0, 68, 2)
    with pytest.raises(ValueError, match="frame indices"):
        fan.predict_landmarks(tiny, frames, np.zeros((2, 4)), np.zeros(1))
    with pytest.raises(ValueError, match="frame_index"):
        fan.predict_landmarks(tiny, frames, np.zeros((1, 4)), np.array([1]))
    with pytest.raises(ValueError, match="uint8"):
        fan.predict_landmarks(tiny, frames.astype(np.float32), np.zeros((1, 4)), np.zeros(1))
