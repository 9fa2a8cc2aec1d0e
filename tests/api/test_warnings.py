"""Result warnings: what a lip-sync will change unasked, found at check time from real probed media."""

from __future__ import annotations

from musetalk_service.api.requests import check_limits, prepare_request
from musetalk_service.api.schemas import LipsyncBody
from tests.api.conftest import SMALL_FACE_BOX


def warnings_for(settings, video, audio, **options) -> tuple[str, ...]:
    body = LipsyncBody(video_path=str(video), audio_path=str(audio), face_box=SMALL_FACE_BOX, **options)
    return check_limits(prepare_request(body, settings), settings).warnings


def test_no_warning_when_nothing_changes(tiny_settings, small_video, make_audio):
    assert warnings_for(tiny_settings, small_video, make_audio(0.2, ".m4a")) == ()


def test_wav_is_reencoded_longer_audio_cycles_and_a_float_fps_resamples(tiny_settings, small_video, make_audio):
    found = warnings_for(tiny_settings, small_video, make_audio(1.0), fps=29.97)

    assert any(w.startswith("audio: the pcm_s16le track was encoded to AAC") for w in found), found
    assert any(w.startswith("fps: the video's 25 fps was resampled to 2997/100") for w in found), found
    assert any(w.startswith("video cycled") for w in found), found


def test_a_float_fps_the_snap_changed_is_named(tiny_settings, small_video, make_audio):
    found = warnings_for(tiny_settings, small_video, make_audio(0.2, ".m4a"), fps=33.3333)

    assert any(w.startswith("fps: 33.3333 was taken as 100/3") for w in found), found
