"""The tracked face phase on a real face: the shipped Haar detector, skimage's astronaut moved by known
translations, faces blanked out, two faces, a faceless video through the real pipeline, a Haar-mode
lip-sync on weights without S3FD and FAN, and a smoke run of the face benchmark."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from musetalk_service.benchmark.faces import run_face_bench
from musetalk_service.errors import NoFace
from musetalk_service.media.encode import encoder_for
from musetalk_service.media.probe import probe_video
from musetalk_service.media.synth import write_talking_head_video
from musetalk_service.nets.haar_face import HaarFaceDetector
from musetalk_service.nets.layout import FACE_NET_KEYS, weight_file
from musetalk_service.pipeline.faces import FaceLocator
from musetalk_service.contract import LipsyncRequest
from musetalk_service.pipeline.runner import LipsyncPipeline
from musetalk_service.pipeline.tracking import box_jitter
from musetalk_service.settings import EncodeSettings, FaceSettings, load_settings

FPS = 25
BATCH = 16
W, H = 960, 540
GREY = 90
# The MuseTalk crop of the 512x512 photo from hand-placed landmarks (tests/nets/test_haar_face.py):
# jaw x 181..270, nose point 29 at y 118, chin at 179, so the top is 118 - (179 - 118) = 57.
ASTRONAUT_CROP = np.array([181, 57, 270, 179])
PLACED_AT = np.array([224, 0])  # the photo's top-left corner in the frame before any motion
HAAR = FaceSettings(detector="haar")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


def _canvas(astronaut: np.ndarray) -> np.ndarray:
    canvas = np.full((H, W, 3), GREY, np.uint8)
    x, y = PLACED_AT
    canvas[y : y + 512, x : x + 512] = astronaut[: H - y]
    return canvas


def _translated(canvas: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    return np.stack([
        cv2.warpAffine(canvas, np.float32([[1, 0, dx], [0, 1, dy]]), (W, H), borderValue=(GREY,) * 3)
        for dx, dy in shifts
    ])


def _head_motion(n: int) -> np.ndarray:
    """Integer (dx, dy) per frame: a head swaying 60 px sideways at 0.4 Hz, nodding 10 px at 0.3 Hz."""
    t = np.arange(n) / FPS
    return np.round(np.stack([60 * np.sin(2 * np.pi * 0.4 * t), 10 * np.sin(2 * np.pi * 0.3 * t + 1.0)], 1)).astype(int)


def _true_boxes(shifts: np.ndarray) -> np.ndarray:
    return ASTRONAUT_CROP + np.tile(PLACED_AT, 2) + np.tile(shifts, 2)


def _request(**options) -> LipsyncRequest:
    # No extra margin: the boxes compare directly with the crop rule's.
    options.setdefault("extra_margin", 0)
    return LipsyncRequest(video_path=Path("v.mp4"), audio_path=Path("a.wav"), output_path=Path("o.mp4"), **options)


def _locate(locator: FaceLocator, frames: np.ndarray) -> list:
    """Feed the frames in batches, in order, as the runner does."""
    out = []
    for start in range(0, len(frames), BATCH):
        indices = list(range(start, min(start + BATCH, len(frames))))
        out += locator.locate(frames[indices], indices)
    return out


@pytest.fixture
def detector_calls(monkeypatch) -> list[int]:
    """The number of frames of each call to the Haar detector, from now on."""
    calls: list[int] = []
    detect = HaarFaceDetector.detect

    def counting(self, frames, scale=None):
        calls.append(len(frames))
        return detect(self, frames, scale)

    monkeypatch.setattr(HaarFaceDetector, "detect", counting)
    return calls


def test_moving_face_is_followed_on_every_frame_with_keyframe_detections(astronaut, detector_calls):
    shifts = _head_motion(75)
    frames = _translated(_canvas(astronaut), shifts)
    locator = FaceLocator(None, _request(), HAAR, FPS)

    boxes = np.array(_locate(locator, frames))

    truth = _true_boxes(shifts)
    centre_error = np.linalg.norm((boxes[:, :2] + boxes[:, 2:]) / 2 - (truth[:, :2] + truth[:, 2:]) / 2, axis=1)
    # The error includes the Haar ratios' own offset on this face (1-2 px) and the cascade's pixel grid.
    assert centre_error.mean() <= 4 and centre_error.max() <= 7, centre_error.round(1)
    assert np.abs(boxes - truth).max() <= 9
    # The detector saw keyframes only, 4 + 4 + 4 + 4 + 3 over the batches of 16 (detect_every 5).
    assert HAAR.detect_every == 5
    assert sum(detector_calls) == locator.detector_frames == 19


def test_still_face_gives_a_still_box(astronaut):
    # A still head with sensor noise: the cascade's box wobbles between pyramid steps, the crop must not.
    frames = _translated(_canvas(astronaut), np.zeros((75, 2), int)).astype(np.int16)
    frames += np.random.default_rng(0).integers(-8, 9, frames.shape, dtype=np.int16)
    frames = np.clip(frames, 0, 255).astype(np.uint8)

    boxes = _locate(FaceLocator(None, _request(), HAAR, FPS), frames)

    assert None not in boxes
    # Per-frame detection without smoothing: 1.25 px; tracked and smoothed: 0.12 px.
    assert box_jitter(boxes) < 0.5


def test_frames_without_a_face_get_none_and_the_face_comes_back(astronaut):
    shifts = _head_motion(64)
    frames = _translated(_canvas(astronaut), shifts)
    blank = list(range(22, 37))  # across a batch boundary, not on keyframes
    frames[blank] = GREY

    boxes = _locate(FaceLocator(None, _request(), HAAR, FPS), frames)

    assert [i for i, b in enumerate(boxes) if b is None] == blank
    truth = _true_boxes(shifts)
    for i in (*range(22), *range(37, 64)):
        assert np.abs(np.array(boxes[i]) - truth[i]).max() <= 8, i


def _two_faces(astronaut: np.ndarray, big: bool = True) -> np.ndarray:
    canvas = np.full((H, W, 3), GREY, np.uint8)
    if big:
        canvas[20:500, 0:480] = cv2.resize(astronaut, (480, 480), interpolation=cv2.INTER_AREA)
    # The smaller face is still ~45 px in the detector's 640 px copy: the cascade misses smaller ones.
    canvas[60:420, 580:940] = cv2.resize(astronaut, (360, 360), interpolation=cv2.INTER_AREA)
    return canvas


# The crops of the two pasted photos (the 512 px crop scaled with each photo, then placed).
BIG_CROP = ASTRONAUT_CROP * 480 / 512 + [0, 20, 0, 20]
SMALL_CROP = ASTRONAUT_CROP * 360 / 512 + [580, 60, 580, 60]


def _centre(box) -> np.ndarray:
    return (np.asarray(box[:2], float) + np.asarray(box[2:], float)) / 2


def test_of_two_faces_the_larger_is_taken_and_kept(astronaut):
    shifts = _head_motion(48) // 3
    boxes = _locate(FaceLocator(None, _request(), HAAR, FPS), _translated(_two_faces(astronaut), shifts))

    for box, (dx, dy) in zip(boxes, shifts):
        assert np.linalg.norm(_centre(box) - _centre(BIG_CROP) - (dx, dy)) < 8


def test_the_tracked_face_is_kept_when_a_larger_one_enters(astronaut):
    shifts = _head_motion(48) // 3
    frames = np.concatenate([
        _translated(_two_faces(astronaut, big=False), shifts[:20]),
        _translated(_two_faces(astronaut), shifts[20:]),
    ])
    boxes = _locate(FaceLocator(None, _request(), HAAR, FPS), frames)

    for box, (dx, dy) in zip(boxes, shifts):
        assert np.linalg.norm(_centre(box) - _centre(SMALL_CROP) - (dx, dy)) < 6


def test_a_given_face_box_skips_detection(astronaut, detector_calls):
    frames = _translated(_canvas(astronaut), _head_motion(20))
    boxes = _locate(FaceLocator(None, _request(face_box=(400, 40, 520, 200)), HAAR, FPS), frames)
    assert boxes == [(400, 40, 520, 200)] * 20
    assert detector_calls == []


def test_a_video_without_any_face_is_no_face_and_leaves_nothing(
    tiny_bundle, tiny_models_dir, ffmpeg_exe, speech_wav, tmp_path
):
    video = write_talking_head_video(
        tmp_path / "blank.mp4", 2.0, FPS, (128, 96), image_bgr=np.zeros((96, 128, 3), np.uint8), ffmpeg=ffmpeg_exe
    )
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    settings = load_settings(models_dir=tiny_models_dir, device="cpu", work_dir=work_dir, face={"detector": "haar"})
    pipeline = LipsyncPipeline(tiny_bundle, settings, encoder_for("libx264", EncodeSettings()), ffmpeg_exe)
    output = tmp_path / "out.mp4"

    with pytest.raises(NoFace, match=r"\b50 frames tried"):
        pipeline.run(LipsyncRequest(video_path=video, audio_path=speech_wav, output_path=output, batch_size=8))

    assert not output.exists()
    assert list(work_dir.iterdir()) == []


def test_haar_mode_lip_syncs_a_real_face_without_the_s3fd_and_fan_files(
    tiny_models_dir, talking_head_video, make_audio, tmp_path
):
    # The weights of a machine that cannot fetch S3FD and 2DFAN4, loaded as the service does.
    models_dir = Path(shutil.copytree(tiny_models_dir, tmp_path / "models"))
    for key in FACE_NET_KEYS:
        weight_file(key).path(models_dir).unlink()
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    settings = load_settings(models_dir=models_dir, device="cpu", work_dir=work_dir, face={"detector": "haar"})
    pipeline = LipsyncPipeline.load(settings)
    assert pipeline.models.face_detector is None and pipeline.models.landmarker is None
    output = tmp_path / "out.mp4"

    result = pipeline.run(
        LipsyncRequest(video_path=talking_head_video, audio_path=make_audio(1.0), output_path=output, batch_size=8)
    )

    assert result.frames == probe_video(output).frame_count == 25
    # The cascade found the astronaut on every frame: each one went through the networks.
    assert result.frames_without_face == 0
    assert list(work_dir.iterdir()) == []


def test_face_bench_runs_on_cpu_with_tiny_weights(tiny_bundle, tiny_models_dir):
    settings = load_settings(models_dir=tiny_models_dir, device="cpu")

    report = run_face_bench(tiny_bundle, settings, seconds=1, size=(320, 240), fps=25)

    assert {"device", "weights", "note", "video", "settings", "throughput", "stability"} <= report.keys()
    assert report["weights"] == "random" and "random" in report["note"]
    throughput = report["throughput"]
    assert throughput["per_frame"]["fps"] > 0 and throughput["tracked"]["fps"] > 0
    assert throughput["per_frame"]["detector_frames"] == 25 > throughput["tracked"]["detector_frames"]
    stability = report["stability"]
    assert stability["detector"] == "haar"
    assert {"jitter_px", "error_px", "frames_without_face"} <= stability["still"].keys()
    assert {"lag_frames", "error_px", "jitter_px", "true_jitter_px"} <= stability["moving"].keys()
    assert stability["still"]["frames_without_face"] == stability["moving"]["frames_without_face"] == 0


def test_frames_too_small_for_the_detector_are_a_clean_result_not_a_crash(
    tiny_bundle, tiny_models_dir, ffmpeg_exe, speech_wav, tmp_path
):
    """S3FD pools a 24x16 frame to nothing; the phase pads it and goes on (random tiny weights
    may or may not "see" a face there: either a finished output or NoFace, never a crash)."""
    video = write_talking_head_video(tmp_path / "tiny.mp4", 1.0, FPS, (24, 16), ffmpeg=ffmpeg_exe)
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    settings = load_settings(models_dir=tiny_models_dir, device="cpu", work_dir=work_dir)
    pipeline = LipsyncPipeline(tiny_bundle, settings, encoder_for("libx264", EncodeSettings()), ffmpeg_exe)
    output = tmp_path / "out.mp4"
    try:
        result = pipeline.run(LipsyncRequest(video_path=video, audio_path=speech_wav, output_path=output, batch_size=8))
    except NoFace:
        assert not output.exists()
    else:
        assert output.exists() and result.frames > 0
    assert list(work_dir.iterdir()) == []
