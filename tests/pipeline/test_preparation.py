"""One avatar preparation stream: a video prepared ahead of time (POST /avatars, `prepare_avatar`)
and the same video prepared inside a lip-sync request give the same avatar, with detection on
(the shipped Haar detector, tracking with keyframes, on the talking-head clip's moving face)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from musetalk_service.contract import LipsyncRequest
from musetalk_service.media.encode import encoder_for
from musetalk_service.media.synth import speech_like_samples, write_audio
from musetalk_service.nets.runtime import PREP_BATCH
from musetalk_service.pipeline.avatar_cache import Avatar
from musetalk_service.pipeline.runner import LipsyncPipeline
from musetalk_service.settings import EncodeSettings, load_settings

SR = 16000


@pytest.fixture(scope="module")
def haar_pipeline(tiny_bundle, tiny_models_dir, ffmpeg_exe, tmp_path_factory) -> LipsyncPipeline:
    work_dir = tmp_path_factory.mktemp("work")
    settings = load_settings(models_dir=tiny_models_dir, device="cpu", work_dir=work_dir, face={"detector": "haar"})
    return LipsyncPipeline(tiny_bundle, settings, encoder_for("libx264", EncodeSettings()), ffmpeg_exe)


def _tracks() -> dict[str, tuple[np.ndarray, str]]:
    """Audio ending in the middle of a tracking run (22 frames of the clip's 50), and one with a
    silence passed through (`silence: source`: its frames are prepared, not generated)."""
    speech = speech_like_samples(0.9, SR, 1, pause_s=(0.05, 0.15))
    paused = np.concatenate([speech_like_samples(0.3, SR, 2), np.zeros(int(0.5 * SR), np.float32), speech_like_samples(0.2, SR, 3)])
    return {"shorter": (speech, "generate"), "silence": (paused, "source")}


def _assert_same_avatar(made: Avatar, ahead: Avatar) -> None:
    assert made.key == ahead.key and made.frame_count == ahead.frame_count == 50
    assert made.boxes == ahead.boxes
    assert torch.equal(made.latents, ahead.latents)
    assert made.masks.keys() == ahead.masks.keys()
    for key, (values, *where) in ahead.masks.items():
        other, *other_where = made.masks[key]
        assert other_where == where and np.array_equal(other, values), key


@pytest.mark.parametrize("track", ["shorter", "silence"])
def test_an_avatar_prepared_ahead_is_the_one_a_request_on_the_new_video_prepares(haar_pipeline, talking_head_video, tmp_path, track):
    pipeline = haar_pipeline
    options = dict(video_path=talking_head_video, batch_size=8, mask_every=3)
    ahead = pipeline.prepare_avatar(LipsyncRequest.with_defaults(pipeline.settings.lipsync, audio_path=None, output_path=None, **options))
    # Tracked, not given: a box on every frame of the moving head, and not one box for all.
    assert all(box is not None for box in ahead.boxes) and len(set(ahead.boxes)) > 10
    assert pipeline.delete_avatar(ahead.key)

    samples, silence = _tracks()[track]
    request = LipsyncRequest.with_defaults(
        pipeline.settings.lipsync, audio_path=write_audio(tmp_path / "a.wav", samples), output_path=tmp_path / "out.mp4",
        silence=silence, **options,
    )  # fmt: skip
    result = pipeline.run(request)
    assert result.frames < 50 and result.frames % PREP_BATCH  # the output ends inside a tracking run
    if silence == "source":
        assert result.frames_silent > 0
    assert result.avatar_id == ahead.key and result.timings["face_detect"] > 0  # prepared in the request
    _assert_same_avatar(pipeline.avatars.get(result.avatar_id), ahead)
    assert pipeline.delete_avatar(ahead.key)
