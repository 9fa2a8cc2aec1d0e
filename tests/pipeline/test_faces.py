"""Face phase: the landmark box rule, extra margin, the given face_box, the S3FD + FAN finder, and the
tracking bookkeeping of FaceLocator (which frames are detected, interpolated, re-detected) with a scripted detector."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from musetalk_service.errors import InvalidOption
from musetalk_service.pipeline import faces
from musetalk_service.pipeline.faces import (
    FaceLocator,
    HaarFinder,
    S3fdFanFinder,
    apply_extra_margin,
    clamp_box,
    is_valid_box,
    landmarks_to_box,
    smoothing_params,
)
from musetalk_service.contract import LipsyncRequest
from musetalk_service.settings import FaceSettings, SmoothingSettings


def _landmarks(nose=(70.0, 100.0), x_range=(20.0, 120.0), chin=160.0) -> np.ndarray:
    """68 points spread inside x_range, between y=60 and the chin, with landmark 29 at `nose`."""
    points = np.zeros((68, 2), np.float32)
    points[:, 0] = np.linspace(*x_range, 68)
    points[:, 1] = np.linspace(60.0, chin, 68)
    points[29] = nose
    return points


def _request(**options) -> LipsyncRequest:
    return LipsyncRequest(video_path=Path("v.mp4"), audio_path=Path("a.wav"), output_path=Path("o.mp4"), **options)


def test_nose_is_the_vertical_centre():
    # Nose at y=100, chin at 160: the box reaches 60 px above the nose.
    assert landmarks_to_box(_landmarks(), 0, 640, 480) == (20, 40, 120, 160)


def test_landmarks_are_truncated_to_int():
    points = _landmarks(nose=(70.9, 100.9), x_range=(20.7, 120.7), chin=160.9)
    # 20.7 -> 20, 120.7 -> 120, nose 100, chin 160, as int32 casting does.
    assert landmarks_to_box(points, 0, 640, 480) == (20, 40, 120, 160)


def test_bbox_shift_moves_the_top_by_twice_the_shift():
    assert landmarks_to_box(_landmarks(), 5, 640, 480) == (20, 50, 120, 160)
    assert landmarks_to_box(_landmarks(), -7, 640, 480) == (20, 26, 120, 160)


def test_top_is_clamped_at_zero():
    # Nose at 30, chin at 160: the box would start at -100.
    assert landmarks_to_box(_landmarks(nose=(70.0, 30.0)), 0, 640, 480) == (20, 0, 120, 160)


def test_right_and_bottom_are_clamped_to_the_frame():
    # The top still comes from the unclamped chin: the nose stays the centre of the face.
    assert landmarks_to_box(_landmarks(), 0, 100, 150) == (20, 40, 100, 150)


def test_validity_rule():
    assert is_valid_box((20, 40, 120, 160))
    assert not is_valid_box((-1, 40, 120, 160))  # left of the frame
    assert not is_valid_box((20, 40, 20, 160))  # no width
    assert not is_valid_box((20, 160, 120, 160))  # no height
    # A face entirely below the frame: the clamp leaves no height.
    points = _landmarks(nose=(70.0, 600.0), chin=700.0)
    points[:, 1] += 500
    assert not is_valid_box(landmarks_to_box(points, 0, 640, 480))


def test_extra_margin_is_clamped_to_the_frame():
    assert apply_extra_margin((20, 40, 120, 160), 10, 480) == (20, 40, 120, 170)
    assert apply_extra_margin((20, 40, 120, 475), 10, 480) == (20, 40, 120, 480)


def test_clamp_box():
    assert clamp_box((-5, -5, 700, 500), 640, 480) == (0, 0, 640, 480)
    assert clamp_box((650, 10, 700, 50), 640, 480) == (640, 10, 640, 50)


def test_given_face_box_is_used_for_every_frame():
    frames = np.zeros((3, 120, 160, 3), np.uint8)
    locator = FaceLocator(models=None, request=_request(face_box=(10, 20, 90, 100)))
    assert locator.locate(frames, [7, 8, 9]) == [(10, 20, 90, 100)] * 3
    # Partly outside: clipped to the frame.
    locator = FaceLocator(models=None, request=_request(face_box=(100, 50, 200, 150)))
    assert locator.locate(frames[:1], [0]) == [(100, 50, 160, 120)]


@pytest.mark.parametrize("box", [(200, 10, 300, 50), (10, 130, 50, 200), (50, 20, 50, 100), (60, 20, 40, 100)])
def test_given_face_box_outside_the_frame_or_empty_is_rejected(box):
    frames = np.zeros((1, 120, 160, 3), np.uint8)
    with pytest.raises(InvalidOption):
        FaceLocator(models=None, request=_request(face_box=box)).locate(frames, [0])




class _FakeNets:
    """Stands in for S3FD and FAN: fixed detections per frame, landmarks from a callback."""

    def __init__(self, detections, landmarks_for_box):
        self.detections = detections
        self.landmarks_for_box = landmarks_for_box
        self.calls = []

    def detect_faces(self, model, frames, *, scale):
        self.scale = scale
        return [np.asarray(d, np.float32).reshape(-1, 5) for d in self.detections[: len(frames)]]

    def predict_landmarks(self, model, frames, boxes, frame_index):
        self.calls.append((boxes.copy(), frame_index.copy()))
        return np.stack([self.landmarks_for_box(b) for b in boxes])


@pytest.fixture
def fake_nets(monkeypatch):
    def install(detections, landmarks_for_box=lambda box: _landmarks()):
        nets = _FakeNets(detections, landmarks_for_box)
        monkeypatch.setattr(faces, "detect_faces", nets.detect_faces)
        monkeypatch.setattr(faces, "predict_landmarks", nets.predict_landmarks)
        return nets

    return install


_NO_MODELS = SimpleNamespace(face_detector=None, landmarker=None)
_PER_FRAME = FaceSettings(detect_every=1, smoothing=SmoothingSettings(enabled=False))


def test_s3fd_runs_on_a_shrunk_copy(fake_nets):
    nets = fake_nets([[]])
    S3fdFanFinder(_NO_MODELS, max_side=640).detect(np.zeros((1, 480, 1280, 3), np.uint8))
    assert nets.scale == 0.5  # 1280 px wide -> 640
    S3fdFanFinder(_NO_MODELS, max_side=640).detect(np.zeros((1, 240, 320, 3), np.uint8))
    assert nets.scale == 1.0  # never enlarged


def test_per_frame_detection_picks_the_largest_face_and_applies_the_rule(fake_nets):
    small_sharp = [300, 20, 340, 60, 0.99]
    large = [10, 30, 150, 180, 0.8]
    nets = fake_nets([[small_sharp, large], [], [large]])
    frames = np.zeros((3, 480, 1280, 3), np.uint8)
    locator = FaceLocator(_NO_MODELS, _request(extra_margin=10), _PER_FRAME)
    assert locator.locate(frames, [5, 6, 7]) == [(20, 40, 120, 170), None, (20, 40, 120, 170)]
    # FAN ran once, on the chosen face of each frame with a face.
    (landmark_boxes, frame_index), = nets.calls
    np.testing.assert_array_equal(landmark_boxes, [large[:4], large[:4]])
    np.testing.assert_array_equal(frame_index, [0, 2])


def test_invalid_landmark_box_falls_back_to_the_detector_box(fake_nets):
    fake_nets([[[12.7, 30.2, 150.9, 180.4, 0.9]]], lambda box: _landmarks(x_range=(-3.0, 120.0)))
    frames = np.zeros((1, 200, 200, 3), np.uint8)
    # The chosen detector box is rounded to pixels (pick_face), then gets the margin.
    assert FaceLocator(_NO_MODELS, _request(extra_margin=10), _PER_FRAME).locate(frames, [0]) == [(13, 30, 151, 190)]


def test_no_face_anywhere_gives_none_and_no_landmarks(fake_nets):
    nets = fake_nets([[], []])
    locator = FaceLocator(_NO_MODELS, _request(), _PER_FRAME)
    assert locator.locate(np.zeros((2, 64, 64, 3), np.uint8), [0, 1]) == [None, None]
    assert nets.calls == []


def test_tiny_models_run_end_to_end(tiny_bundle):
    frames = np.random.default_rng(0).integers(0, 255, (2, 96, 128, 3), dtype=np.uint8)
    boxes = FaceLocator(tiny_bundle, _request()).locate(frames, [0, 1])
    assert len(boxes) == 2
    for box in boxes:
        assert box is None or (is_valid_box(box) and box[2] <= 128 and box[3] <= 96)


def test_haar_mode_needs_no_networks():
    locator = FaceLocator(None, _request(), FaceSettings(detector="haar"))
    assert isinstance(locator.finder, HaarFinder)
    assert locator.locate(np.zeros((3, 120, 160, 3), np.uint8), [0, 1, 2]) == [None, None, None]


def test_given_face_box_builds_no_detector():
    assert FaceLocator(None, _request(face_box=(0, 0, 10, 10)), FaceSettings(detector="haar")).finder is None


def test_smoothing_settings_reach_the_smoother():
    params = smoothing_params(SmoothingSettings(min_cutoff=0.5, beta=3.0), 30000 / 1001)
    assert (params.min_cutoff, params.beta, params.fps) == (0.5, 3.0, pytest.approx(29.97, abs=1e-3))


# Tracking bookkeeping: a scripted detector that knows, from each frame's pixels, which source frame
# it is, and returns that frame's scripted faces; crop boxes are the detector boxes themselves.

W, H = 640, 360


def _frames(indices) -> np.ndarray:
    frames = np.zeros((len(indices), H, W, 3), np.uint8)
    for k, i in enumerate(indices):
        frames[k, 0, 0, :2] = (i % 256, i // 256)
    return frames


class _ScriptedFinder:
    name = "scripted"

    def __init__(self, faces_of):
        self.faces_of = faces_of  # source index -> list of (x1, y1, x2, y2, score)
        self.detected: list[int] = []

    def detect(self, frames):
        indices = [int(f[0, 0, 0]) + 256 * int(f[0, 0, 1]) for f in frames]
        self.detected += indices
        return [np.asarray(self.faces_of(i), np.float32).reshape(-1, 5) for i in indices]

    def crop_boxes(self, frames, boxes, bbox_shift):
        return list(boxes)


def _tracker(faces_of, detect_every=5, smoothing=False):
    finder = _ScriptedFinder(faces_of)
    settings = FaceSettings(detect_every=detect_every, smoothing=SmoothingSettings(enabled=smoothing))
    return FaceLocator(None, _request(extra_margin=0), settings, fps=25, finder=finder), finder


def _run(locator, n, batch=16):
    out = []
    for start in range(0, n, batch):
        indices = list(range(start, min(start + batch, n)))
        out += locator.locate(_frames(indices), indices)
    return out


def _moving(i):
    """A face moving right 3 px and down 1 px a frame."""
    return (100 + 3 * i, 50 + i, 200 + 3 * i, 170 + i)


def test_detector_runs_on_keyframes_and_boxes_move_in_between():
    locator, finder = _tracker(lambda i: [(*_moving(i), 0.9)])
    boxes = _run(locator, 40)
    # Linear motion: interpolation between keyframes is exact on every frame.
    assert boxes == [_moving(i) for i in range(40)]
    # First batch: 0, 5, 10, 15; the next batches lean on the previous batch's last keyframe.
    assert finder.detected == [0, 5, 10, 15, 19, 23, 27, 31, 35, 39]
    assert locator.detector_frames == 10


def test_detect_every_one_detects_every_frame():
    locator, finder = _tracker(lambda i: [(*_moving(i), 0.9)], detect_every=1)
    assert _run(locator, 20) == [_moving(i) for i in range(20)]
    assert finder.detected == list(range(20))


def test_faces_appearing_and_vanishing_between_keyframes_are_exact():
    present = set(range(7, 25)) | set(range(33, 37))
    locator, finder = _tracker(lambda i: [(*_moving(i), 0.9)] if i in present else [])
    boxes = _run(locator, 45)
    assert [i for i, b in enumerate(boxes) if b is not None] == sorted(present)
    assert all(boxes[i] == _moving(i) for i in present)
    # Only the intervals where the face came or went were detected frame by frame.
    assert len(finder.detected) < 45 and {6, 7, 24, 25, 32, 33, 36, 37} <= set(finder.detected)


def test_the_tracked_face_is_kept_when_a_larger_one_appears():
    big = (400, 40, 620, 300, 0.99)
    locator, _ = _tracker(lambda i: [(*_moving(i), 0.8)] + ([big] if i >= 12 else []))
    assert _run(locator, 40) == [_moving(i) for i in range(40)]


def test_largest_face_wins_without_history():
    big = (400, 40, 620, 300, 0.8)
    locator, _ = _tracker(lambda i: [(*_moving(i), 0.99), big])
    assert set(_run(locator, 20)) == {big[:4]}


def test_a_batch_that_does_not_follow_on_starts_a_new_track():
    locator, finder = _tracker(lambda i: [(*_moving(i), 0.9)])
    locator.locate(_frames(range(8)), list(range(8)))
    locator.locate(_frames(range(20, 28)), list(range(20, 28)))
    # Frame 20 is a keyframe again: nothing before it to lean on.
    assert finder.detected == [0, 3, 7, 20, 23, 27]


def test_gaps_inside_a_batch_are_separate_runs():
    locator, finder = _tracker(lambda i: [(*_moving(i), 0.9)])
    indices = [0, 1, 2, 10, 11]
    assert locator.locate(_frames(indices), indices) == [_moving(i) for i in indices]
    assert finder.detected == [0, 2, 10, 11]


def test_source_indices_must_increase():
    locator, _ = _tracker(lambda i: [])
    with pytest.raises(ValueError):
        locator.locate(_frames([3, 2]), [3, 2])


def test_smoothing_steadies_a_noisy_still_face():
    rng = np.random.default_rng(0)
    noisy = {i: np.array([200, 100, 400, 300]) + rng.integers(-3, 4, 4) for i in range(100)}
    locator, _ = _tracker(lambda i: [(*noisy[i], 0.9)], detect_every=1, smoothing=True)
    boxes = _run(locator, 100)[25:]
    centres = np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes])
    assert np.abs(np.diff(centres, axis=0)).max() <= 1.0
    assert np.abs(centres.mean(0) - (300, 200)).max() < 2
