"""Face phase: where the face box of each source frame is.

MuseTalk 1.5's crop (spec section 3): a detector finds the face, 68 landmarks place the box so that
nose landmark 29 sits on its vertical centre (the lower half, nose to chin, is what the UNet
repaints), then `extra_margin` pixels are added below the chin. We detect with S3FD on a downscaled
frame and take landmarks from FAN on the detected box; the official code takes them from DWPose on
the whole frame, which sees a 1080p face at about a tenth of its size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from musetalk_service.errors import InvalidOption
from musetalk_service.nets.fan import predict_landmarks
from musetalk_service.nets.s3fd import detect_faces
from musetalk_service.pipeline.request import FaceBox, LipsyncRequest

logger = logging.getLogger(__name__)

NOSE_CENTRE = 29
"""iBUG-68 landmark placed at the box's vertical centre (on the nose bridge, above the tip)."""
DETECT_MAX_SIDE = 640
"""S3FD sees frames shrunk so their longer side is at most this. Its cost is linear in pixels
(about 1.3 TFLOP at 1080p at full size) and its smallest anchors are 16 px, so a face a tenth of
a 1080p frame's height is still about 35 px here; the box geometry comes from the landmarks,
which FAN computes at full resolution."""


def clamp_box(box: Sequence[int], frame_w: int, frame_h: int) -> FaceBox:
    """The box clipped to the frame (it may come out empty: x2 <= x1 or y2 <= y1)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return (min(max(x1, 0), frame_w), min(max(y1, 0), frame_h), min(max(x2, 0), frame_w), min(max(y2, 0), frame_h))


def is_valid_box(box: FaceBox) -> bool:
    """The official sanity check on a landmark box: non-empty, not left of the frame."""
    x1, y1, x2, y2 = box
    return x2 - x1 > 0 and y2 - y1 > 0 and x1 >= 0


def landmarks_to_box(landmarks: np.ndarray, bbox_shift: int, frame_w: int, frame_h: int) -> FaceBox:
    """MuseTalk's face box from 68 landmarks `[68, 2]` (x, y) in frame pixels.

    Landmarks are truncated to int32 as in the official code. The nose point (landmark 29, moved
    down by `bbox_shift`) becomes the vertical centre: the box runs from the chin (lowest landmark)
    up by the same distance, clamped at the top of the frame, and spans the landmarks horizontally.
    x2 and y2 are the extreme landmarks themselves used as exclusive ends, as the official crop
    does. Unlike the official code we also clamp x2 and y2 to the frame: numpy slicing truncates
    the crop there anyway, but the paste-back resizes the face to the unclamped size, so the face
    the model saw and the face pasted back would not line up. The result may be invalid (see
    `is_valid_box`); callers fall back to the detector box then.
    """
    points = np.asarray(landmarks).astype(np.int32)
    xs, ys = points[:, 0], points[:, 1]
    centre_y = int(points[NOSE_CENTRE, 1]) + bbox_shift
    chin_y = int(ys.max())
    top = max(0, centre_y - (chin_y - centre_y))
    return (int(xs.min()), top, min(int(xs.max()), frame_w), min(chin_y, frame_h))


def apply_extra_margin(box: FaceBox, extra_margin: int, frame_h: int) -> FaceBox:
    """The v1.5 crop: `extra_margin` more pixels below the chin, within the frame."""
    x1, y1, x2, y2 = box
    return (x1, y1, x2, min(y2 + extra_margin, frame_h))


class FaceLocator:
    """The face phase for one request: `locate(frames, indices)` gives each frame's box or None.

    With the request's `face_box`, that box is used for every frame as given (no margin: it is
    the crop). Otherwise every frame is detected independently; a later tracker can detect every
    N frames and smooth in between behind the same `locate` call, which is why it takes the
    frames' source indices.
    """

    def __init__(self, models: Any, request: LipsyncRequest):
        """`models` needs `.face_detector` and `.landmarker` (a `ModelBundle`); only the request's
        `face_box`, `bbox_shift` and `extra_margin` are read."""
        self.models = models
        self.face_box = request.face_box
        self.bbox_shift = request.bbox_shift
        self.extra_margin = request.extra_margin

    def locate(self, frames: np.ndarray, source_indices: Sequence[int]) -> list[FaceBox | None]:
        """Face boxes for a batch of BGR frames `[B, H, W, 3]`, None where no face is found."""
        if len(frames) != len(source_indices):
            raise ValueError(f"{len(frames)} frames but {len(source_indices)} source indices")
        if len(frames) == 0:
            return []
        height, width = frames.shape[1:3]
        if self.face_box is not None:
            return [self._given_box(width, height)] * len(frames)
        return self._detect(frames, source_indices)

    def _given_box(self, width: int, height: int) -> FaceBox:
        box = clamp_box(self.face_box, width, height)
        if not is_valid_box(box):
            raise InvalidOption(
                f"face_box {list(self.face_box)} has no area inside the {width}x{height} frame; "
                "give (x1, y1, x2, y2) in frame pixels with x1 < x2 and y1 < y2"
            )
        return box

    def _detect(self, frames: np.ndarray, source_indices: Sequence[int]) -> list[FaceBox | None]:
        height, width = frames.shape[1:3]
        scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
        detections = detect_faces(self.models.face_detector, frames, scale=scale)
        with_face = [i for i, found in enumerate(detections) if len(found)]
        boxes: list[FaceBox | None] = [None] * len(frames)
        if with_face:
            detector_boxes = np.stack([_largest(detections[i]) for i in with_face])
            landmarks = predict_landmarks(self.models.landmarker, frames, detector_boxes, np.asarray(with_face))
            for i, detected, points in zip(with_face, detector_boxes, landmarks):
                box = landmarks_to_box(points, self.bbox_shift, width, height)
                if not is_valid_box(box):
                    logger.debug("landmark box %s invalid at frame %d: detector box used", box, source_indices[i])
                    box = clamp_box(detected, width, height)
                if is_valid_box(box):
                    boxes[i] = apply_extra_margin(box, self.extra_margin, height)
        missing = [source_indices[i] for i, box in enumerate(boxes) if box is None]
        if missing:
            logger.debug("no face in source frames %s", missing)
        return boxes


def _largest(detections: np.ndarray) -> np.ndarray:
    """The (x1, y1, x2, y2) of the largest detection; on equal areas, the higher score.

    The official code takes the highest-scoring face. In a talking-head video the speaker is the
    largest face; a smaller, sharper face in the background (a poster, a screen) can score higher.
    """
    areas = (detections[:, 2] - detections[:, 0]) * (detections[:, 3] - detections[:, 1])
    # Detections come highest score first and argmax returns the first maximum.
    return detections[int(np.argmax(areas)), :4]
