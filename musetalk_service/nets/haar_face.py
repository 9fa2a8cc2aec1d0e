"""OpenCV Haar-cascade face detector: the no-download option.

The cascades ship inside the opencv-python(-headless) 4.x wheel (`cv2.data.haarcascades`), so this
detector works on a machine without model-hub access and gives tests a detector that really finds
real faces. It is an option, not the default. How it differs from S3FD + FAN:

- frontal faces only (the optional profile cascade adds strong profiles, with coarser boxes);
  three-quarter views are often missed, and so is a head rolled beyond ~20 degrees (the
  astronaut photo is found up to 20 degrees, not at 25);
- no landmarks: the MuseTalk crop is estimated from the face box with fixed ratios
  (`musetalk_box_from_face_box`) calibrated on one face, so the crop does not follow the jaw
  opening or the head's pitch the way the landmark rule does, and on other faces it can be off
  by several % of the face size;
- boxes are quantised by the cascade's scale pyramid (10 % steps), so they jitter more between
  frames and rely on the box smoother;
- the score is the cascade's neighbour count (number of raw windows merged into the box), not a
  probability: comparable between frames of one video, not with S3FD's scores.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np

from musetalk_service.contract import FaceBox

logger = logging.getLogger(__name__)

FRONTAL_CASCADE = "haarcascade_frontalface_alt2.xml"
"""alt2 rather than `default`: on the astronaut photo at 7 scales and mirrored it returns exactly one
box every time (default: up to 5 at the larger scales) and its box-to-face ratios vary less."""
PROFILE_CASCADE = "haarcascade_profileface.xml"

# MuseTalk crop from a frontal alt2 box (x, y, side s), calibrated on skimage's astronaut photo:
# 68-point landmarks placed by hand on an 8x zoom (jaw x 181..270, nose point 29 at y 118 between
# the eye line and the nose tip, chin point 8 at y 179), against the alt2 box detected at 7 scales
# (0.6x..2.5x) of the photo and of its mirror image. Mean ratio (std over the 14 runs):
# jaw left 0.040 (0.010), jaw right 0.970 (0.013), nose 0.543 (0.005), chin 1.180 (0.007). The x
# ratios are made symmetric (mean of the photo and its mirror) as the box is centred on the face.
_JAW_LEFT = 0.035
_JAW_RIGHT = 0.965
_NOSE_Y = 0.543
_CHIN_Y = 1.180


def _nms(boxes: np.ndarray, iou: float) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, in the given (priority) order."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    for i in range(len(boxes)):
        k = np.asarray(keep, dtype=np.int64)
        iw = np.clip(np.minimum(boxes[i, 2], boxes[k, 2]) - np.maximum(boxes[i, 0], boxes[k, 0]), 0, None)
        ih = np.clip(np.minimum(boxes[i, 3], boxes[k, 3]) - np.maximum(boxes[i, 1], boxes[k, 1]), 0, None)
        inter = iw * ih
        if not np.any(inter / (areas[i] + areas[k] - inter) > iou):
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


class HaarFaceDetector:
    """Face detection with OpenCV's Haar cascades, on a downscaled grey copy of each frame.

    Use one instance per thread (OpenCV does not document CascadeClassifier as thread-safe); one
    call already spreads over the CPU cores.
    """

    def __init__(
        self,
        *,
        profile: bool = False,
        max_side: int = 640,
        min_face: float = 0.1,
        min_neighbors: int = 4,
        scale_factor: float = 1.1,
    ) -> None:
        """`max_side`: the longer side of the grey copy the cascade runs on when `detect` gets no
        scale; 640 keeps a 1080p talking head's face near 100 px, where the box geometry is stable
        (at ~35 px alt2 starts missing faces). `min_face`: the smallest face searched, as a
        fraction of the frame's shorter side; the small windows are most of the cost (1080p, 2
        CPU cores: ~60-90 ms a frame at 0.1, ~20-25 ms at 0.2). `min_neighbors`: raw windows
        needed to accept a face (higher: fewer false positives, more misses)."""
        self.profile = profile
        self.max_side = max_side
        self.min_face = min_face
        self.min_neighbors = min_neighbors
        self.scale_factor = scale_factor
        self._frontal = self._load(FRONTAL_CASCADE)
        self._profile = self._load(PROFILE_CASCADE) if profile else None

    @staticmethod
    def _load(name: str) -> cv2.CascadeClassifier:
        path = cv2.data.haarcascades + name
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():
            raise RuntimeError(f"OpenCV could not load {path} (opencv-python 4.x ships the cascades; 5.x does not)")
        return cascade

    def detect(self, frames_bgr: np.ndarray, scale: float | None = None) -> list[np.ndarray]:
        """Faces in each frame of a `[B, H, W, 3]` uint8 BGR batch (a single `[H, W, 3]` frame also works).

        Returns one float32 `[k, 5]` array per frame: x1, y1, x2, y2 (original pixels, x2/y2
        exclusive, clipped to the frame) and score (neighbour count), best first; `[0, 5]` when
        there is no face. `scale` is the factor the cascade's grey copy is resized by (1.0: full
        size); unset: the copy's longer side is `max_side` (never upscaled).
        """
        frames = np.asarray(frames_bgr)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected [B, H, W, 3] BGR frames, got shape {frames.shape}")
        height, width = frames.shape[1:3]
        if scale is None:
            scale = min(1.0, self.max_side / max(height, width))
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        small = (max(1, round(width * scale)), max(1, round(height * scale)))
        min_side = max(20, int(self.min_face * min(small)))
        return [self._detect_one(frame, small, min_side, width, height) for frame in frames]

    def _detect_one(
        self, frame: np.ndarray, small: tuple[int, int], min_side: int, width: int, height: int
    ) -> np.ndarray:
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if small != (width, height):
            grey = cv2.resize(grey, small, interpolation=cv2.INTER_AREA)
        # Equalising makes the cascade's fixed thresholds hold in dim or flat light.
        grey = cv2.equalizeHist(grey)
        found = [self._run(self._frontal, grey, min_side, mirrored=False)]
        if self._profile is not None:
            # The profile cascade only knows faces turned one way: run it on the mirror too.
            found += [self._run(self._profile, grey, min_side, mirrored=m) for m in (False, True)]
        boxes = np.concatenate(found)
        if len(boxes):
            # Frontal boxes come first, so on overlap they win over profile ones (better geometry).
            boxes = boxes[_nms(boxes, 0.3)]
            boxes = boxes[np.argsort(-boxes[:, 4], kind="stable")]
            boxes[:, :4] /= np.array([small[0] / width, small[1] / height] * 2, dtype=np.float32)
            boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
            boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
        return boxes

    def _run(self, cascade: cv2.CascadeClassifier, grey: np.ndarray, min_side: int, mirrored: bool) -> np.ndarray:
        image = grey[:, ::-1].copy() if mirrored else grey
        rects, neighbours = cascade.detectMultiScale2(
            image, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(min_side, min_side)
        )
        if len(rects) == 0:
            return np.zeros((0, 5), dtype=np.float32)
        rects = np.asarray(rects, dtype=np.float32)
        score = np.asarray(neighbours, dtype=np.float32).ravel()
        x1 = grey.shape[1] - rects[:, 0] - rects[:, 2] if mirrored else rects[:, 0]
        out = np.stack([x1, rects[:, 1], x1 + rects[:, 2], rects[:, 1] + rects[:, 3], score], 1)
        return out[np.argsort(-score, kind="stable")]


def musetalk_box_from_face_box(
    face_box: Sequence[float] | np.ndarray, frame_w: int, frame_h: int, bbox_shift: int = 0
) -> FaceBox:
    """Estimate MuseTalk's landmark crop box from a frontal Haar face box (no landmarks needed).

    Mirrors the landmark rule (musetalk-v15.md section 3.2) on points placed at calibrated ratios
    of the face box: x from the jaw's extent, the nose point (landmark 29, moved by `bbox_shift`)
    at the vertical centre, the chin at the bottom, the top as far above the nose as the chin is
    below it (clamped at 0). extra_margin is not added here: the face phase adds it below the chin
    as for landmark boxes. The result is clipped to the frame and is never empty.
    """
    x1, y1, x2, y2 = (float(v) for v in face_box[:4])
    side_w, side_h = x2 - x1, y2 - y1
    if side_w <= 0 or side_h <= 0:
        raise ValueError(f"empty face box: {tuple(face_box[:4])}")
    nose = y1 + _NOSE_Y * side_h + bbox_shift
    chin = y1 + _CHIN_Y * side_h
    left = int(np.clip(round(x1 + _JAW_LEFT * side_w), 0, frame_w - 1))
    right = int(np.clip(round(x1 + _JAW_RIGHT * side_w), left + 1, frame_w))
    top = int(np.clip(round(nose - (chin - nose)), 0, frame_h - 1))
    bottom = int(np.clip(round(chin), top + 1, frame_h))
    return (left, top, right, bottom)
