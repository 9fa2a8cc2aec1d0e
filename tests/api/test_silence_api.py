"""`silence` through a real server: the option is accepted and checked, and the response and
/metrics count the frames generated and the frames passed through as silent."""

from __future__ import annotations

import numpy as np

from musetalk_service.media.synth import speech_like_samples, write_audio
from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import assert_error, metric


def test_silence_source_counts_generated_and_silent_frames_in_the_response_and_metrics(client, small_video, tmp_path):
    # speech 0.4 s | digital silence 0.8 s | speech 0.4 s: 40 frames at 25 fps, some of them silent.
    speech = [speech_like_samples(0.4, 16000, seed, pause_s=(0.05, 0.1)) for seed in (1, 2)]
    audio = write_audio(tmp_path / "a.wav", np.concatenate([speech[0], np.zeros(12800, np.float32), speech[1]]))
    before = {name: metric(client, name) for name in ("musetalk_frames_generated_total", "musetalk_frames_silent_total")}

    response = client.post(
        "/lipsync",
        json={"video_path": str(small_video), "audio_path": str(audio), "face_box": SMALL_FACE_BOX, "silence": "source"},
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["frames"] == 40
    assert body["frames_silent"] > 0 and body["frames_generated"] > 0
    assert body["frames_generated"] + body["frames_silent"] + body["frames_without_face"] == body["frames"]
    assert metric(client, "musetalk_frames_generated_total") - before["musetalk_frames_generated_total"] == body["frames_generated"]
    assert metric(client, "musetalk_frames_silent_total") - before["musetalk_frames_silent_total"] == body["frames_silent"]


def test_a_bad_silence_value_is_400_naming_the_option(client, small_video, tmp_path):
    audio = write_audio(tmp_path / "a.wav", speech_like_samples(0.2))
    response = client.post("/lipsync", json={"video_path": str(small_video), "audio_path": str(audio), "silence": "mute"})

    assert_error(response, 400, "invalid_option", "silence", "'generate' or 'source'")
