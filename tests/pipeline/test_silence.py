"""Silence detection (pipeline/silence.py) on synthetic tracks, and `silence: source` end to end."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from musetalk_service.media.synth import speech_like_samples, write_audio
from musetalk_service.contract import LipsyncRequest
from musetalk_service.pipeline.silence import SilencePlan, SilenceRule, fade_weights, speech_activity

SR = 16000


def _speech(seconds: float, seed: int) -> np.ndarray:
    return speech_like_samples(seconds, SR, seed, pause_s=(0.05, 0.15))


def _track() -> np.ndarray:
    """speech 0.8 s | digital silence 0.8 s | speech 0.8 s | noise at -70 dBFS 0.8 s | speech 0.6 s."""
    noise = (np.random.default_rng(0).standard_normal(int(0.8 * SR)) * 10 ** (-70 / 20)).astype(np.float32)
    zeros = np.zeros(int(0.8 * SR), np.float32)
    return np.concatenate([_speech(0.8, 1), zeros, _speech(0.8, 2), noise, _speech(0.6, 3)])


def test_digital_silence_and_low_noise_are_silent_speech_and_short_pauses_are_not():
    activity = speech_activity(_track(), SR)
    hop = lambda t: int(t * 100)  # noqa: E731
    assert activity[hop(0.0) : hop(0.75)].all() and activity[hop(1.8) : hop(2.35)].all()  # each part opens with 0.15 s of lead-in
    assert not activity[hop(0.85) : hop(1.55)].any() and not activity[hop(2.45) : hop(3.15)].any()


def test_a_quiet_voiced_section_30_db_down_is_kept_and_thresholds_follow_the_track():
    quiet = np.concatenate([_speech(0.8, 1), _speech(0.8, 2) * 10 ** (-30 / 20)])
    assert speech_activity(quiet, SR).all()
    track = _track()
    assert np.array_equal(speech_activity(track * 1.5, SR), speech_activity(track, SR))


def test_hysteresis_keeps_a_fading_voice_until_it_falls_below_the_lower_threshold():
    tone = lambda s, db: (np.sin(2 * np.pi * 200 * np.arange(int(s * SR)) / SR) * 10 ** (db / 20)).astype(np.float32)  # noqa: E731
    # Between the thresholds (-40 and -46 dB under the track's level): speech after speech, silence after silence.
    middle = tone(0.6, -43)
    after_speech = np.concatenate([tone(1.0, 0), middle, np.zeros(SR, np.float32)])
    after_silence = np.concatenate([tone(1.0, 0), np.zeros(SR, np.float32), middle])
    assert speech_activity(after_speech, SR)[100:160].all()
    assert not speech_activity(after_silence, SR)[200:260].any()
    assert not speech_activity(after_speech, SR, SilenceRule(hysteresis_db=0.0, threshold_db=-40))[100:160].all()


def test_silences_shorter_than_the_minimum_keep_generating():
    short = np.concatenate([_speech(0.6, 1), np.zeros(int(0.1 * SR), np.float32), _speech(0.6, 2)])  # + 0.15 s lead-in
    long = np.concatenate([_speech(0.6, 1), np.zeros(int(0.5 * SR), np.float32), _speech(0.6, 2)])
    assert speech_activity(short, SR).all()
    assert not speech_activity(long, SR)[65:105].any()


def test_fades_step_monotonically_into_silence_and_an_all_silent_track_is_all_zero():
    speech = np.array([1] * 3 + [0] * 12 + [1] * 2, bool)
    w = fade_weights(speech, 4)
    assert np.allclose(w[3:7], [0.8, 0.6, 0.4, 0.2]) and (w[7:11] == 0).all() and np.allclose(w[11:15], [0.2, 0.4, 0.6, 0.8])
    plan = SilencePlan.from_samples(np.zeros(SR, np.float32), SR, Fraction(25), 25, SilenceRule(), 4)
    assert not plan.generates and plan.silent_frames == 25


def test_silent_frames_pass_through_untouched_and_the_unet_skips_them(tiny_pipeline, tmp_path, monkeypatch):
    from musetalk_service.media.encode import VideoEncoder
    import musetalk_service.pipeline.generate as generate
    from musetalk_service.pipeline.source import pingpong_index
    from tests.pipeline.test_runner import decode_all, indexed_video

    written: list[np.ndarray] = []
    real_write = VideoEncoder.write
    monkeypatch.setattr(VideoEncoder, "write", lambda self, frames: (written.append(np.asarray(frames).reshape(-1, 256, 256, 3)), real_write(self, frames))[1])
    sent: list[int] = []
    real_generate = generate.generate_faces
    monkeypatch.setattr(generate, "generate_faces", lambda models, latents, windows: (sent.append(len(latents)), real_generate(models, latents, windows))[1])
    video = indexed_video(tmp_path / "v.mp4", 12, Fraction(25), tiny_pipeline.ffmpeg, tiny_pipeline.settings)
    audio = write_audio(tmp_path / "a.wav", _track()[: int(2.4 * SR)])
    request = LipsyncRequest.with_defaults(
        tiny_pipeline.settings.lipsync, video_path=video, audio_path=audio, output_path=tmp_path / "out.mp4",
        face_box=(64, 72, 192, 224), silence="source",
    )
    result = tiny_pipeline.run(request)
    assert result.frames == 60 and result.frames_silent > 0
    assert result.frames_generated + result.frames_silent == 60 == sum(sent) + result.frames_silent
    out = np.concatenate(written)[-60:]  # after the test video's own 12 frames
    source = decode_all(video, tiny_pipeline.ffmpeg)
    for i in range(25, 35):  # well inside the silence (0.8-1.6 s: frames 20-39, fades of 4)
        assert np.array_equal(out[i], source[pingpong_index(i, 12)])  # the video cycles (ping-pong)
    assert not np.array_equal(out[10], source[pingpong_index(10, 12)])  # speech: generated


def _silence_run(pipeline, tmp_path, samples: np.ndarray, **options):
    """`silence: source` on a 12-frame indexed video; the result, the output's frames and the
    source frame of each output frame (ping-pong)."""
    from musetalk_service.pipeline.source import pingpong_index
    from tests.pipeline.test_runner import decode_all, indexed_video

    video = indexed_video(tmp_path / "v.mp4", 12, Fraction(25), pipeline.ffmpeg, pipeline.settings)
    request = LipsyncRequest.with_defaults(
        pipeline.settings.lipsync, video_path=video, audio_path=write_audio(tmp_path / "a.wav", samples),
        output_path=tmp_path / "out.mp4", silence="source", **options,
    )  # fmt: skip
    result = pipeline.run(request)
    source = decode_all(video, pipeline.ffmpeg)
    return result, decode_all(result.output_path, pipeline.ffmpeg), np.stack([source[pingpong_index(i, 12)] for i in range(result.frames)])


def test_boundaries_fade_monotonically_and_silence_is_as_close_to_the_source_as_a_re_encode(tiny_pipeline, tmp_path):
    from musetalk_service.media.encode import VideoEncoder, encoder_for
    from tests.pipeline.test_runner import FACE_BOX, decode_all

    samples = _track()[: int(2.4 * SR)]
    result, out, source = _silence_run(tiny_pipeline, tmp_path, samples, face_box=FACE_BOX)
    weights = SilencePlan.from_samples(samples, SR, Fraction(25), 60, SilenceRule(), tiny_pipeline.settings.silence.fade_frames).weights
    x1, y1, x2, y2 = FACE_BOX
    mouth = lambda frames: frames[:, (y1 + y2) // 2 : y2, x1:x2].astype(int)  # noqa: E731 - the blended half of the box
    distance = np.abs(mouth(out) - mouth(source)).mean(axis=(1, 2, 3))
    # Into the silence (weights stepping down from the last speech frame) and out of it (up to the next).
    last_speech = int(np.flatnonzero(weights[:30] == 1)[-1])
    next_speech = 30 + int(np.flatnonzero(weights[30:] == 1)[0])
    fade_out, fade_in = range(last_speech, last_speech + 6), range(next_speech - 5, next_speech + 1)
    assert np.all(np.diff(weights[list(fade_out)]) < 0) and np.all(np.diff(weights[list(fade_in)]) > 0)
    assert np.all(np.diff(distance[list(fade_out)]) < 0), distance[list(fade_out)]
    assert np.all(np.diff(distance[list(fade_in)]) > 0), distance[list(fade_in)]
    # Well inside the silence the output is the source re-encoded: as close to it as a plain
    # re-encode of the source frames at the same encoder settings.
    inside = slice(last_speech + 7, next_speech - 6)
    assert inside.stop - inside.start >= 4
    choice = encoder_for("libx264", tiny_pipeline.settings.encode)
    with VideoEncoder(tmp_path / "re.mp4", 256, 256, Fraction(25), choice, tiny_pipeline.ffmpeg) as encoder:
        encoder.write(source)
    again = decode_all(tmp_path / "re.mp4", tiny_pipeline.ffmpeg)
    ours = np.abs(out[inside].astype(int) - source[inside]).mean()
    theirs = np.abs(again[inside].astype(int) - source[inside]).mean()
    assert ours <= theirs + 0.25, (ours, theirs)


def test_an_all_silent_track_gives_the_source_video_back_with_its_audio_without_a_face(tiny_pipeline, tmp_path, monkeypatch):
    """No face box, and no face phase at all (no avatar is built): a video where no face would be
    found gives its frames back too."""
    import musetalk_service.pipeline.flow as flow
    import musetalk_service.pipeline.generate as generate
    from musetalk_service.media.probe import probe_audio
    from tests.pipeline.test_runner import frame_codes

    def never(*args, **kwargs):
        raise AssertionError("a face phase or the UNet ran")

    monkeypatch.setattr(generate, "generate_faces", never)
    monkeypatch.setattr(flow, "AvatarPreparation", never)
    silent = np.zeros(int(0.8 * SR), np.float32)
    result, out, source = _silence_run(tiny_pipeline, tmp_path, silent)
    assert result.frames == 20 == result.frames_silent and result.frames_generated == 0 and result.avatar_id is None
    assert frame_codes(out) == frame_codes(source)  # the source's frames, in ping-pong order
    assert np.abs(out.astype(int) - source).mean() < 3  # as encoded, nothing pasted
    assert probe_audio(result.output_path).duration_s == pytest.approx(0.8, abs=0.05)
