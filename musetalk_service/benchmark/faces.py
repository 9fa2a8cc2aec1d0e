"""Face-phase benchmark: per-frame S3FD + FAN against the tracked face phase, and box stability.

Throughput runs `FaceLocator` over a synthetic talking head with head motion (`synth.talking_head_frames`,
made batch by batch so memory stays flat), in the runner's batch size, once with detect_every 1
and once with the configured tracking, both on S3FD + FAN. Only `locate` is timed, with CUDA
synchronised before each clock read; the first batch runs once untimed first (allocations, kernel
selection).

With random weights S3FD finds random faces, and boxes that jump between keyframes would make the
tracker re-detect every frame: a cost real weights never pay. So with random weights S3FD still
runs on every frame the tracker asks for, at full cost, but its boxes are replaced by one fixed
face box (the Haar detector's on the first frame); FAN runs on every frame as with real weights.

Stability needs a detector that finds the real face, so it uses the Haar detector (shipped with
OpenCV) through the same tracked `FaceLocator`, on the astronaut photo moved by a known
similarity transform (pan and zoom, no rotation, so the true crop box is exact): jitter on a still
head, lag and error on a moving one, each also without smoothing for comparison.
"""

from __future__ import annotations

import itertools
import logging
import platform
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from musetalk_service.media.synth import talking_head_frames
from musetalk_service.nets.haar_face import HaarFaceDetector
from musetalk_service.pipeline.faces import FaceLocator, S3fdFanFinder
from musetalk_service.nets.runtime import PREP_BATCH
from musetalk_service.contract import FaceBox, LipsyncRequest
from musetalk_service.pipeline.tracking import box_error, box_jitter, box_lag
from musetalk_service.settings import FaceSettings, Settings

logger = logging.getLogger(__name__)

# The MuseTalk crop of skimage's 512x512 astronaut photo, from 68 landmarks placed by hand (see
# nets/haar_face.py): jaw x 181..270, nose point 29 at y 118, chin at 179, top 118 - (179 - 118).
_ASTRONAUT_CROP = np.array([181.0, 57.0, 270.0, 179.0])
_FACE_HEIGHT = 0.3
"""The crop's height as a fraction of the frame's: a talking-head framing."""
_BACKGROUND = 90
"""Grey around the moved photo: a reflected border would add mirrored faces."""
_NOISE = 7
"""Camera noise added to the stability scenes, uniform in +-7 grey levels (sd 4.3): identical
frames would give any detector a perfectly still box."""


_WEIGHTS_NOTE = (
    "random weights: S3FD and FAN run at full cost but S3FD's boxes are replaced by a fixed face box "
    "(throughput only); stability uses the Haar detector, which needs no weights"
)


class _FixedFaceS3fd(S3fdFanFinder):
    """S3FD at full cost whose detections are replaced by one fixed face box (random weights)."""

    name = "s3fd+fan (random weights: boxes replaced by a fixed face)"

    def __init__(self, models: Any, max_side: int, face: FaceBox):
        super().__init__(models, max_side)
        self.face = np.array([[*face, 1.0]], np.float32)

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        super().detect(frames)
        return [self.face.copy() for _ in frames]


def run_face_bench(
    models: Any,
    settings: Settings,
    *,
    seconds: float = 10.0,
    size: tuple[int, int] = (1920, 1080),
    fps: float | Fraction = 25,
) -> dict:
    """Measure the face phase on `models` (a `ModelBundle` loaded with S3FD and FAN, i.e. for
    `face.detector: s3fd`) with `settings.face`; see the module docstring.

    `size` is (w, h). Returns a JSON-ready dict: device, weights, video, settings, throughput
    (frames/s per-frame and tracked, detector frames, speedup) and stability (Haar: still-head
    jitter, moving-head lag and error, in px and frames, smoothed and not).
    """
    count = max(1, round(seconds * float(fps)))
    batch = PREP_BATCH  # the runner's face-tracking run length
    request = LipsyncRequest.with_defaults(
        settings.lipsync, video_path=Path("bench.mp4"), audio_path=Path("bench.wav"), output_path=Path("bench-out.mp4")
    )
    result = {
        "device": _device_name(models.device),
        "weights": models.weights_kind,
        "note": _WEIGHTS_NOTE if models.weights_kind == "random" else None,
        "video": {"size": list(size), "fps": float(fps), "frames": count, "batch_size": batch},
        "settings": settings.face.model_dump(),
        "throughput": _throughput(models, settings.face, request, count, batch, size, fps),
        "stability": _stability(settings.face, request, count, batch, size, fps) if _haar_available() else None,
    }
    logger.info(
        "face bench on %s: per-frame %.1f fps, tracked %.1f fps; stability %s",
        result["device"], result["throughput"]["per_frame"]["fps"], result["throughput"]["tracked"]["fps"],
        result["stability"] or "not measured: this OpenCV build has no Haar cascades",
    )
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _batches(frames: Iterator[np.ndarray], batch: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """(source indices, [b, H, W, 3] frames) in order, one batch in memory at a time."""
    start = 0
    while chunk := list(itertools.islice(frames, batch)):
        yield list(range(start, start + len(chunk))), np.stack(chunk)
        start += len(chunk)


def _throughput(
    models: Any,
    face: FaceSettings,
    request: LipsyncRequest,
    count: int,
    batch: int,
    size: tuple[int, int],
    fps: float | Fraction,
) -> dict:
    modes = {
        "per_frame": face.model_copy(update={"detector": "s3fd", "detect_every": 1}),
        "tracked": face.model_copy(update={"detector": "s3fd"}),
    }
    first = next(talking_head_frames(1, fps, size))

    def locator(mode: FaceSettings) -> FaceLocator:
        return tracked_locator(models, mode, request, fps, first)

    def sync() -> None:
        if models.device.type == "cuda":
            torch.cuda.synchronize(models.device)

    # Warm-up on the first batch with throwaway locators: cuDNN picks kernels, the allocator grows.
    indices, frames = next(_batches(talking_head_frames(batch, fps, size), batch))
    for mode in modes.values():
        locator(mode).locate(frames, indices)
    sync()

    locators = {name: locator(mode) for name, mode in modes.items()}
    elapsed = dict.fromkeys(modes, 0.0)
    # Both locators see each batch as it is made, so the frames are made once and never all held.
    for indices, frames in _batches(talking_head_frames(count, fps, size), batch):
        for name, loc in locators.items():
            sync()
            started = time.perf_counter()
            loc.locate(frames, indices)
            sync()
            elapsed[name] += time.perf_counter() - started
    out: dict[str, Any] = {"detector": next(iter(locators.values())).finder.name}
    for name, loc in locators.items():
        out[name] = {
            "fps": count / elapsed[name],
            "seconds": elapsed[name],
            "detect_every": modes[name].detect_every,
            "detector_frames": loc.detector_frames,
        }
    out["speedup"] = out["tracked"]["fps"] / out["per_frame"]["fps"]
    return out


def tracked_locator(models: Any, face: FaceSettings, request: LipsyncRequest, fps: float | Fraction, first_frame: np.ndarray) -> FaceLocator:
    """The face phase as a request runs it with `face`; with random weights and S3FD, its boxes
    replaced by the face found in `first_frame` (see the module docstring)."""
    finder = None
    if models.weights_kind == "random" and face.detector == "s3fd":
        finder = _FixedFaceS3fd(models, face.detect_max_side, _haar_face(first_frame))
    return FaceLocator(models, request, face, fps, finder=finder)


def _haar_available() -> bool:
    # OpenCV 5 builds dropped CascadeClassifier (the GPU machine's has none; ours pins 4.14).
    return hasattr(cv2, "CascadeClassifier")


def _haar_face(frame: np.ndarray) -> FaceBox:
    """The Haar detector's face on one frame, else a box in the frame's middle (cost is what counts)."""
    found = HaarFaceDetector().detect(frame)[0] if _haar_available() else []
    if len(found):
        x1, y1, x2, y2 = (int(v) for v in found[0, :4])
        return (x1, y1, x2, y2)
    height, width = frame.shape[:2]
    return (width // 3, height // 4, 2 * width // 3, 3 * height // 4)


def _scene_transform(size: tuple[int, int], fps: float, motion: bool) -> Callable[[int], np.ndarray]:
    """Frame index -> the 2x3 matrix mapping the astronaut photo into frame i (similarity, no rotation).

    The photo is scaled so the crop is `_FACE_HEIGHT` of the frame and centred; with `motion` the
    head pans 4 % of the width at 0.25 Hz, nods 2 % of the height at 0.35 Hz and the camera zooms
    +-3 % at 0.2 Hz about the frame's centre: up to ~5 px a frame at 1080p, 25 fps.
    """
    width, height = size
    crop_w, crop_h = _ASTRONAUT_CROP[2:] - _ASTRONAUT_CROP[:2]
    scale = _FACE_HEIGHT * height / crop_h
    centre = np.array([width / 2, height / 2])
    offset = centre - scale * (_ASTRONAUT_CROP[:2] + np.array([crop_w, crop_h]) / 2)

    def matrix(i: int) -> np.ndarray:
        zoom, pan = 1.0, np.zeros(2)
        if motion:
            t = i / fps
            zoom = 1.0 + 0.03 * np.sin(2 * np.pi * 0.2 * t)
            pan = np.array([
                0.04 * width * np.sin(2 * np.pi * 0.25 * t),
                0.02 * height * np.sin(2 * np.pi * 0.35 * t + 1.0),
            ])
        s = zoom * scale
        shift = centre * (1 - zoom) + zoom * offset + pan
        return np.array([[s, 0.0, shift[0]], [0.0, s, shift[1]]])

    return matrix


def _scene(count: int, size: tuple[int, int], fps: float, motion: bool) -> tuple[Iterator[np.ndarray], list[FaceBox]]:
    """Frames (made lazily, with camera noise) of the astronaut under `_scene_transform`, and the
    true crop box of each."""
    from skimage.data import astronaut  # local: scikit-image is slow to import

    photo = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR)
    matrix = _scene_transform(size, fps, motion)
    truth = []
    for i in range(count):
        m = matrix(i)
        x1, y1 = m[:, :2] @ _ASTRONAUT_CROP[:2] + m[:, 2]
        x2, y2 = m[:, :2] @ _ASTRONAUT_CROP[2:] + m[:, 2]
        truth.append((round(x1), round(y1), round(x2), round(y2)))
    rng = np.random.default_rng(0)

    def frames() -> Iterator[np.ndarray]:
        for i in range(count):
            frame = cv2.warpAffine(photo, matrix(i), size, flags=cv2.INTER_LINEAR, borderValue=(_BACKGROUND,) * 3)
            noise = rng.integers(-_NOISE, _NOISE + 1, frame.shape, dtype=np.int8)
            yield cv2.add(frame, noise, dtype=cv2.CV_8U)

    return frames(), truth


def _stability(
    face: FaceSettings,
    request: LipsyncRequest,
    count: int,
    batch: int,
    size: tuple[int, int],
    fps: float | Fraction,
) -> dict:
    # No extra margin: boxes compare directly with the crop rule's true box.
    request = LipsyncRequest(request.video_path, request.audio_path, request.output_path, bbox_shift=0, extra_margin=0)
    haar = face.model_copy(update={"detector": "haar"})
    variants = {
        "smoothed": haar,
        "unsmoothed": haar.model_copy(update={"smoothing": haar.smoothing.model_copy(update={"enabled": False})}),
    }
    # The smoother starts from the first, noisy box; metrics skip its first second.
    settle = min(round(float(fps)), count // 4)
    out: dict[str, Any] = {"detector": "haar", "frames": count, "settle_frames": settle}
    for scenario, motion in (("still", False), ("moving", True)):
        frames, truth = _scene(count, size, float(fps), motion)
        locators = {name: FaceLocator(None, request, settings, fps) for name, settings in variants.items()}
        boxes: dict[str, list[FaceBox | None]] = {name: [] for name in variants}
        for indices, batch_frames in _batches(frames, batch):
            for name, loc in locators.items():
                boxes[name] += loc.locate(batch_frames, indices)
        truth = truth[settle:]
        result: dict[str, Any] = {"detector_frames": locators["smoothed"].detector_frames}
        if motion:
            result["true_jitter_px"] = box_jitter(truth)
        for name, found in boxes.items():
            found = found[settle:]
            suffix = "" if name == "smoothed" else "_unsmoothed"
            # On a moving head jitter includes the motion: compare it with true_jitter_px.
            result[f"jitter_px{suffix}"] = box_jitter(found)
            if motion:
                result[f"lag_frames{suffix}"] = box_lag(truth, found)
            # Includes the Haar ratios' fixed offset from the landmark crop (about 1.5 % of the face).
            result[f"error_px{suffix}"] = box_error(truth, found)
            result[f"frames_without_face{suffix}"] = sum(b is None for b in found)
        out[scenario] = result
    return out
