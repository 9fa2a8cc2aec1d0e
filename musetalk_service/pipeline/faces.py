"""Face phase: where the MuseTalk crop box of each source frame is.

MuseTalk 1.5's crop (spec section 3): a detector finds the face, 68 landmarks place the box so that
nose landmark 29 sits on its vertical centre (the lower half, nose to chin, is what the UNet
repaints), then `extra_margin` pixels are added below the chin. We detect with S3FD on a downscaled
frame and take landmarks from FAN on the detected box; the official code takes them from DWPose on
the whole frame, which sees a 1080p face at about a tenth of its size.

Tracking (`FaceLocator`): the detector runs on keyframes only, and every other frame gets a box:

1. Keyframes are spread evenly over each batch, at most `face.detect_every` frames apart, and the
   batch's last frame is always one (the runner needs this batch's boxes before it reads the
   next, so nothing can be interpolated towards a later batch). The previous batch's last
   keyframe anchors the next batch, so a batch of 16 with detect_every 5 costs 4 detections.
2. One face per keyframe: `tracking.pick_face` (the face overlapping the previous keyframe's
   choice, else the largest). It is the one multi-face rule of the service.
3. Where a face appears, vanishes or jumps between two keyframes (`tracking.frames_to_redetect`),
   every frame in between is detected too, so frames without a face keep `None` exactly and no
   box slides across the frame.
4. The detector boxes are interpolated linearly between keyframes (`tracking.interpolate_boxes`):
   the box moves with the head instead of freezing for N frames.
5. The crop box of every frame with a box: S3FD path, FAN landmarks on every frame, batched over
   the batch's crops, through the landmark rule (the detector box where the landmark box is
   invalid, as the official code does); Haar path, `musetalk_box_from_face_box` ratios.
6. One `OneEuroBoxSmoother` per request, fed in source order at the video's frame rate, then
   `extra_margin` and the clamp to the frame.

Measured choices (CPU, this repository's code):
- Interpolated, not held, detector boxes; detect_every 5 by default. The astronaut photo swaying
  60 px at 0.4 Hz in a 960x540 frame (tests/pipeline/test_face_tracking.py's motion, 150 frames,
  Haar, no smoothing), centre error / lag against the known box: per-frame detection 2.0 px / 0
  frames (150 detections); every 5, interpolated 2.0 px / 0 (38), held 6.8 px / 2; every 10,
  interpolated 2.8 px / 0 (20), held 13.7 px / 3. Smoothing adds 0.2-0.3 px of error there, and
  takes a still head with sensor noise from 1.25 px of jitter (per frame, raw) to 0.12 px.
- FAN on every frame rather than landmark boxes interpolated between keyframes: the crop's bottom
  is the chin, which moves with speech between keyframes, and the official crop follows it every
  frame. FAN is 50 GFLOP a crop against 146 GFLOP for S3FD at 640x360 (FlopCounterMode), so with
  a keyframe in 4 the face phase costs about 0.45x of per-frame S3FD + FAN, most of it FAN. FAN
  takes its box from the interpolation, not from the previous frame's landmarks, so a batch's
  crops go through the network in one call instead of one frame at a time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
import torch

from musetalk_service.errors import InvalidOption
from musetalk_service.nets.fan import predict_landmarks
from musetalk_service.nets.haar_face import HaarFaceDetector, musetalk_box_from_face_box
from musetalk_service.nets.s3fd import detect_faces
from musetalk_service.pipeline.batch import Batch
from musetalk_service.pipeline.frames import DeviceFrame, DeviceFrames
from musetalk_service.pipeline.latents import FACE_SIZE, crop_faces
from musetalk_service.pipeline.timing import PhaseTimer
from musetalk_service.contract import FaceBox, LipsyncRequest
from musetalk_service.pipeline.tracking import (
    OneEuroBoxSmoother,
    SmoothingParams,
    frames_to_redetect,
    interpolate_boxes,
    keyframe_positions,
    pick_face,
)
from musetalk_service.settings import FaceSettings, SmoothingSettings

logger = logging.getLogger(__name__)

NOSE_CENTRE = 29
"""iBUG-68 landmark placed at the box's vertical centre (on the nose bridge, above the tip)."""


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


class FaceFinder(Protocol):
    """A detector plus the rule that turns its per-frame boxes into MuseTalk crop boxes."""

    name: str

    def detect(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Faces `[k, 5]` (x1, y1, x2, y2, score; frame pixels) for each BGR frame `[H, W, 3]`."""

    def crop_boxes(self, frames: np.ndarray, boxes: Sequence[FaceBox | None], bbox_shift: int) -> list[FaceBox | None]:
        """The crop box (before extra_margin) of each frame from its detector box; None stays None."""


class S3fdFanFinder:
    """S3FD on a copy shrunk to `max_side` (resized on the device), FAN landmarks at full resolution.

    `max_side`: S3FD's cost is linear in pixels (about 1.3 TFLOP at 1080p at full size) and its
    smallest anchors are 16 px, so at 640 a face a tenth of a 1080p frame's height is still about
    35 px; the box geometry comes from the landmarks, which FAN computes on full-resolution crops.
    """

    name = "s3fd+fan"

    def __init__(self, models: Any, max_side: int):
        self.models = models
        self.max_side = max_side

    def detect(self, frames: Sequence[np.ndarray | DeviceFrame]) -> list[np.ndarray]:
        scale = min(1.0, self.max_side / max(frames[0].shape[:2]))
        pixels = [frame.pixels if isinstance(frame, DeviceFrame) else frame for frame in frames]
        return detect_faces(self.models.face_detector, pixels, scale=scale)

    def crop_boxes(self, frames: np.ndarray, boxes: Sequence[FaceBox | None], bbox_shift: int) -> list[FaceBox | None]:
        height, width = frames.shape[1:3]
        with_face = [i for i, box in enumerate(boxes) if box is not None]
        out: list[FaceBox | None] = [None] * len(boxes)
        if not with_face:
            return out
        detector_boxes = np.array([boxes[i] for i in with_face], dtype=np.float64)
        landmarks = predict_landmarks(self.models.landmarker, frames, detector_boxes, np.asarray(with_face))
        for i, points in zip(with_face, landmarks):
            box = landmarks_to_box(points, bbox_shift, width, height)
            if not is_valid_box(box):
                logger.debug("landmark box %s invalid: detector box %s used", box, boxes[i])
                box = clamp_box(boxes[i], width, height)
            out[i] = box if is_valid_box(box) else None
        return out


class HaarFinder:
    """OpenCV's shipped Haar cascade (no downloaded weights) and fixed box-to-crop ratios."""

    name = "haar"

    def __init__(self, max_side: int):
        # One cascade per locator, i.e. per request: OpenCV does not promise it is thread-safe.
        self.detector = HaarFaceDetector(max_side=max_side)

    def detect(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.detector.detect(frames)

    def crop_boxes(self, frames: np.ndarray, boxes: Sequence[FaceBox | None], bbox_shift: int) -> list[FaceBox | None]:
        height, width = frames.shape[1:3]
        return [None if b is None else musetalk_box_from_face_box(b, width, height, bbox_shift) for b in boxes]


def make_finder(models: Any, settings: FaceSettings) -> FaceFinder:
    """The configured detector; the Haar one touches neither `models` nor any weights file."""
    if settings.detector == "haar":
        return HaarFinder(settings.detect_max_side)
    return S3fdFanFinder(models, settings.detect_max_side)


def smoothing_params(smoothing: SmoothingSettings, fps: float) -> SmoothingParams:
    """The smoother's parameters from the settings, at the boxes' frame rate."""
    return replace(SmoothingParams(), **smoothing.model_dump(exclude={"enabled"}), fps=float(fps))


class FaceLocator:
    """The face phase for one request: `locate(frames, indices)` gives each frame's crop box or None.

    With the request's `face_box`, that box is used for every frame as given (no detection, no
    margin: it is the crop). Otherwise faces are tracked as the module docstring says. `locate`
    must see each source frame once, batches in increasing source order; state (the last
    keyframe's face, the smoother) carries from one batch to the next, and a batch that does not
    follow on from the previous one restarts the track.
    """

    def __init__(
        self,
        models: Any,
        request: LipsyncRequest,
        settings: FaceSettings | None = None,
        fps: float | Fraction = 25.0,
        finder: FaceFinder | None = None,
    ):
        """`models`: a `ModelBundle` (only `.face_detector` and `.landmarker`, and only for
        S3FD); `settings`: `Settings.face` (default: its defaults); `fps`: the source frames'
        rate, the smoother's time base; `finder` replaces the configured detector (benchmark)."""
        settings = settings or FaceSettings()
        self.face_box = request.face_box
        self.bbox_shift = request.bbox_shift
        self.extra_margin = request.extra_margin
        self.detect_every = settings.detect_every
        self.finder: FaceFinder | None = None
        if self.face_box is None:
            self.finder = finder or make_finder(models, settings)
        self._smoother: OneEuroBoxSmoother | None = None
        if settings.smoothing.enabled:
            self._smoother = OneEuroBoxSmoother(smoothing_params(settings.smoothing, fps))
        self._last_key: tuple[int, FaceBox | None] | None = None
        """(source index, chosen detector box) of the latest keyframe: the next batch's anchor."""
        self.detector_frames = 0
        """Frames the detector ran on so far (keyframes and re-detections)."""

    def locate(self, frames: np.ndarray | DeviceFrames, source_indices: Sequence[int]) -> list[FaceBox | None]:
        """Crop boxes for a batch of BGR frames `[B, H, W, 3]`, None where there is no face.

        `frames` may be `DeviceFrames` with S3FD (not with Haar, which reads whole frames on the CPU)."""
        if len(frames) != len(source_indices):
            raise ValueError(f"{len(frames)} frames but {len(source_indices)} source indices")
        if len(frames) == 0:
            return []
        height, width = frames.shape[1:3]
        if self.face_box is not None:
            return [self._given_box(width, height)] * len(frames)
        indices = [int(i) for i in source_indices]
        if any(b <= a for a, b in zip(indices, indices[1:])):
            raise ValueError(f"source indices must be strictly increasing, got {indices}")
        boxes: list[FaceBox | None] = []
        start = 0
        for end in range(1, len(indices) + 1):
            if end == len(indices) or indices[end] != indices[end - 1] + 1:
                boxes += self._locate_run(frames[start:end], indices[start:end])
                start = end
        return boxes

    def _given_box(self, width: int, height: int) -> FaceBox:
        box = clamp_box(self.face_box, width, height)
        if not is_valid_box(box):
            raise InvalidOption(
                f"face_box {list(self.face_box)} has no area inside the {width}x{height} frame; "
                "give (x1, y1, x2, y2) in frame pixels with x1 < x2 and y1 < y2"
            )
        return box

    def _locate_run(self, frames: np.ndarray | DeviceFrames, indices: list[int]) -> list[FaceBox | None]:
        """Boxes for consecutive source frames."""
        n = len(frames)
        anchored = self._last_key is not None and self._last_key[0] == indices[0] - 1
        if not anchored and self._smoother is not None:
            # The run does not follow the last one: the head may be anywhere.
            self._smoother.reset()
        # Positions are local to the run; the anchor, the previous batch's last keyframe, is -1.
        detections: dict[int, np.ndarray] = {}
        to_detect = keyframe_positions(n, self.detect_every, anchored)
        while to_detect:
            # A list of views: `frames[to_detect]` would copy the whole frames first.
            found = self.finder.detect([frames[p] for p in to_detect])
            self.detector_frames += len(to_detect)
            detections.update(zip(to_detect, found))
            positions, chosen = self._choose(detections, anchored)
            to_detect = frames_to_redetect(positions, chosen)
        offset = 1 if anchored else 0
        detector_boxes = interpolate_boxes([p + offset for p in positions], chosen, n + offset)[offset:]
        # The run's last frame is always a keyframe.
        self._last_key = (indices[-1], chosen[-1])
        crops = self.finder.crop_boxes(frames, detector_boxes, self.bbox_shift)
        height, width = frames.shape[1:3]
        out = [self._finish(box, width, height) for box in crops]
        missing = [indices[i] for i, box in enumerate(out) if box is None]
        if missing:
            logger.debug("no face in source frames %s", missing)
        return out

    def _choose(self, detections: dict[int, np.ndarray], anchored: bool) -> tuple[list[int], list[FaceBox | None]]:
        """Keyframe positions in order (the anchor first, when there is one) and each one's face.

        Chosen again from scratch after every re-detection: a face found in between changes the
        previous box the next keyframe's choice is made against.
        """
        previous = self._last_key[1] if self._last_key is not None else None
        positions = [-1] if anchored else []
        chosen: list[FaceBox | None] = [previous] if anchored else []
        for p in sorted(detections):
            previous = pick_face(detections[p], previous)
            positions.append(p)
            chosen.append(previous)
        return positions, chosen

    def _finish(self, box: FaceBox | None, width: int, height: int) -> FaceBox | None:
        """Smoothed (a None resets the smoother), extra margin, clamped to the frame."""
        if self._smoother is not None:
            box = self._smoother.update(box)
        if box is None:
            return None
        box = clamp_box(apply_extra_margin(box, self.extra_margin, height), width, height)
        return box if is_valid_box(box) else None


@dataclass(frozen=True)
class LocatedFrames:
    """The face phase's result for consecutive source frames, from `first` on."""

    first: int
    boxes: list[FaceBox | None]
    rows: list[int]
    """Positions (in this batch) of the frames with a face."""
    crops: np.ndarray
    """The faces of `rows`, `[len(rows), 256, 256, 3]` BGR, as `latents.crop_faces` cuts them for the VAE."""


class FaceStage:
    """Face phase of a new video (the face thread): boxes and the VAE's face crops of each batch's
    new source frames (`Batch.prepare`), fed in source order.

    On a CUDA stream of its own, so its waits for results never wait for the UNet. The crops are
    cut here, not in the GPU thread, because the GPU thread bounds a new video (H100, 2026-11-24:
    17.6 s busy of 19.3 s, the face thread 12.4 s). Tracking runs end on multiples of
    `prep_batch` however the batches fall, so the boxes are those of any other preparation.
    """

    def __init__(self, locator: FaceLocator, device: torch.device | str, prep_batch: int, timer: PhaseTimer):
        self.locator = locator
        self.prep_batch = prep_batch
        self.timer = timer
        self.boxes: list[FaceBox | None] = []
        """Every located source frame's box, in order (the avatar's boxes once all are located)."""
        self._stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None

    @property
    def located(self) -> int:
        return len(self.boxes)

    @property
    def has_face(self) -> bool:
        return any(box is not None for box in self.boxes)

    def run(self, batch: Batch) -> Batch:
        if batch.prepare is not None:
            with self.timer.phase("face_detect"):
                batch.located = self.locate(batch.prepare)
        return batch

    def locate(self, frames: np.ndarray | DeviceFrames) -> LocatedFrames:
        """Boxes and face crops of the next source frames `[b, H, W, 3]`, host or device."""
        first = len(self.boxes)
        boxes: list[FaceBox | None] = []
        context = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with context:
            start = 0
            while start < len(frames):
                end = min(len(frames), start + self.prep_batch - (first + start) % self.prep_batch)
                boxes += self.locator.locate(frames[start:end], range(first + start, first + end))
                start = end
        self.boxes.extend(boxes)
        rows = [k for k, box in enumerate(boxes) if box is not None]
        # Views of the frames, not `frames[rows]`: that would copy whole 1080p frames to crop them.
        crops = crop_faces([frames[k] for k in rows], [boxes[k] for k in rows]) if rows else np.empty((0, FACE_SIZE, FACE_SIZE, 3), np.uint8)
        return LocatedFrames(first, boxes, rows, crops)
