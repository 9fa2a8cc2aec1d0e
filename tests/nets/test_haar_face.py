"""The Haar-cascade detector on a real face (skimage's astronaut photo), still and moving."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from musetalk_service.nets.haar_face import HaarFaceDetector, musetalk_box_from_face_box
from musetalk_service.pipeline.tracking import box_iou

# Checked by eye on an 8x zoom of the 512x512 photo: jaw x 181..270, brows y ~75, chin y 179.
FACE_REGION = (180, 70, 270, 180)
NOSE_Y, CHIN_Y = 118, 179


@pytest.fixture(scope="module")
def astronaut_bgr() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


@pytest.fixture(scope="module")
def detector() -> HaarFaceDetector:
    return HaarFaceDetector()


def test_finds_the_astronaut(detector, astronaut_bgr):
    (faces,) = detector.detect(astronaut_bgr[None])
    assert faces.shape == (1, 5) and faces.dtype == np.float32
    assert box_iou(faces[0], FACE_REGION) > 0.5
    assert faces[0, 4] >= detector.min_neighbors


def _translated(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, shift, image.shape[1::-1], borderMode=cv2.BORDER_REPLICATE)


def test_follows_a_moving_face(detector, astronaut_bgr):
    shifts = [(0, 0), (12, -5), (25, -10), (37, 4), (-20, 15), (-40, 30)]
    frames = np.stack([_translated(astronaut_bgr, dx, dy) for dx, dy in shifts])
    results = detector.detect(frames)
    assert all(len(r) == 1 for r in results)
    base = results[0][0, :4]
    for (dx, dy), faces in zip(shifts, results):
        assert np.abs(faces[0, :4] - base - np.array([dx, dy, dx, dy])).max() <= 4


def test_downscaled_detection_maps_back_to_original_pixels(detector, astronaut_bgr):
    (full,) = detector.detect(astronaut_bgr[None], scale=1.0)
    (half,) = detector.detect(astronaut_bgr[None], scale=0.5)
    assert box_iou(full[0], half[0]) > 0.8


@pytest.mark.parametrize(
    "frame",
    [np.zeros((360, 640, 3), np.uint8), np.random.default_rng(0).integers(0, 256, (360, 640, 3), np.uint8)],
    ids=["blank", "noise"],
)
def test_no_face_gives_an_empty_array(detector, frame):
    (faces,) = detector.detect(frame[None])
    assert faces.shape == (0, 5)


def test_profile_option_keeps_the_frontal_face(astronaut_bgr):
    (faces,) = HaarFaceDetector(profile=True).detect(astronaut_bgr[None], scale=0.75)
    assert len(faces) >= 1
    assert box_iou(faces[0], FACE_REGION) > 0.5
    assert np.all(np.diff(faces[:, 4]) <= 0)


def test_musetalk_box_is_nose_centred_on_the_astronaut(detector, astronaut_bgr):
    (faces,) = detector.detect(astronaut_bgr[None])
    x1, y1, x2, y2 = musetalk_box_from_face_box(faces[0], 512, 512)
    # The landmark rule puts nose point 29 at the vertical centre and the chin at the bottom.
    assert abs((y1 + y2) / 2 - NOSE_Y) <= 4
    assert abs(y2 - CHIN_Y) <= 5
    assert abs(x1 - 181) <= 5 and abs(x2 - 270) <= 5


def test_musetalk_box_stays_inside_the_frame():
    for face in [(0, 0, 100, 100), (560, 380, 640, 480), (-10, 300, 90, 480), (300, 5, 380, 85)]:
        x1, y1, x2, y2 = musetalk_box_from_face_box(np.array(face, np.float32), 640, 480)
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480
        assert all(isinstance(v, int) for v in (x1, y1, x2, y2))


def test_musetalk_box_bbox_shift_moves_the_top_twice_as_far():
    face = (200, 200, 300, 300)
    base = musetalk_box_from_face_box(face, 1000, 1000)
    shifted = musetalk_box_from_face_box(face, 1000, 1000, bbox_shift=5)
    assert shifted[1] - base[1] == 10 and shifted[3] == base[3]


def test_musetalk_box_rejects_an_empty_face_box():
    with pytest.raises(ValueError):
        musetalk_box_from_face_box((10, 10, 10, 20), 100, 100)
