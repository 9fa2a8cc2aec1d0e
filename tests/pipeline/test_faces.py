"""Face phase: the landmark box rule, extra margin, the given face_box, and detection bookkeeping."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from musetalk_service.errors import InvalidOption
from musetalk_service.pipeline import faces
from musetalk_service.pipeline.faces import (
    FaceLocator,
    apply_extra_margin,
    clamp_box,
    is_valid_box,
    landmarks_to_box,
)
from musetalk_service.pipeline.request import LipsyncRequest


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
        return [np.asarray(d, np.float32).reshape(-1, 5) for d in self.detections]

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


def _locator(**options) -> FaceLocator:
    return FaceLocator(SimpleNamespace(face_detector=None, landmarker=None), _request(**options))


def test_detection_picks_the_largest_face_and_applies_the_rule(fake_nets):
    small_sharp = [300, 20, 340, 60, 0.99]
    large = [10, 30, 150, 180, 0.8]
    nets = fake_nets([[small_sharp, large], [], [large]])
    frames = np.zeros((3, 480, 1280, 3), np.uint8)
    boxes = _locator(extra_margin=10).locate(frames, [5, 6, 7])
    assert boxes == [(20, 40, 120, 170), None, (20, 40, 120, 170)]
    (landmark_boxes, frame_index), = nets.calls
    np.testing.assert_array_equal(landmark_boxes, [large[:4], large[:4]])
    np.testing.assert_array_equal(frame_index, [0, 2])
    assert nets.scale == 0.5  # 1280 px wide -> 640


def test_invalid_landmark_box_falls_back_to_the_detector_box(fake_nets):
    fake_nets([[[12.7, 30.2, 150.9, 180.4, 0.9]]], lambda box: _landmarks(x_range=(-3.0, 120.0)))
    frames = np.zeros((1, 200, 200, 3), np.uint8)
    assert _locator(extra_margin=10).locate(frames, [0]) == [(12, 30, 150, 190)]


def test_no_face_anywhere_gives_none(fake_nets):
    nets = fake_nets([[], []])
    assert _locator().locate(np.zeros((2, 64, 64, 3), np.uint8), [0, 1]) == [None, None]
    assert nets.calls == []


def test_tiny_models_run_end_to_end(tiny_bundle):
    frames = np.random.default_rng(0).integers(0, 255, (2, 96, 128, 3), dtype=np.uint8)
    boxes = FaceLocator(tiny_bundle, _request()).locate(frames, [0, 1])
    assert len(boxes) == 2
    for box in boxes:
        assert box is None or (is_valid_box(box) and box[2] <= 128 and box[3] <= 96)
