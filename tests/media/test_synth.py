"""Synthetic media: speech-shaped audio and talking-head video with exact lengths."""

from __future__ import annotations

import wave
from fractions import Fraction

import numpy as np
import pytest

from musetalk_service.media.probe import count_video_frames, probe_audio, probe_video
from musetalk_service.media.synth import speech_like_samples, write_speech_like_audio, write_talking_head_video

from .conftest import decode_all


def test_speech_is_deterministic_and_sized():
    a = speech_like_samples(3.0, 16000)
    assert a.dtype == np.float32 and a.size == 48000
    assert np.array_equal(a, speech_like_samples(3.0, 16000))
    assert not np.array_equal(a, speech_like_samples(3.0, 16000, seed=1))
    assert np.abs(a).max() == pytest.approx(0.6, abs=1e-6)
    assert speech_like_samples(0).size == 0


def test_speech_has_syllables_pauses_and_a_voice_pitch():
    sr = 16000
    samples = speech_like_samples(6.0, sr)
    frames = samples[: samples.size // 320 * 320].reshape(-1, 320)  # 20 ms windows
    rms = np.sqrt((frames**2).mean(1))
    voiced = rms > 0.02
    assert 0.3 < voiced.mean() < 0.85  # speech with pauses, not a tone and not silence
    onsets = np.count_nonzero(voiced[1:] & ~voiced[:-1])
    assert 1.5 <= onsets / 6.0 <= 6  # phrase/syllable rate

    power = np.abs(np.fft.rfft(samples)) ** 2
    freqs = np.fft.rfftfreq(samples.size, 1 / sr)
    assert power[freqs > 4000].sum() < 0.05 * power.sum()  # energy in the speech band
    assert power[freqs < 80].sum() < 0.05 * power.sum()  # no hum or DC

    loudest = frames[np.argmax(rms)]
    autocorr = np.correlate(loudest, loudest, "full")[319:]
    lag = np.argmax(autocorr[sr // 200 : sr // 70]) + sr // 200  # search 70-200 Hz
    assert 100 <= sr / lag <= 150  # the glottal pulse rate


def test_wav_file(tmp_path):
    path = write_speech_like_audio(tmp_path / "s.wav", 1.5, 22050)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 22050, 33075)


def test_unsupported_extension(tmp_path):
    with pytest.raises(ValueError, match="unsupported audio extension '.aiff'"):
        write_speech_like_audio(tmp_path / "s.aiff", 1.0)


@pytest.mark.parametrize("ext, codec", [(".mp3", "mp3"), (".m4a", "aac"), (".ogg", "vorbis")])
def test_transcoded_files(make_audio, ext, codec):
    info = probe_audio(make_audio(2.0, ext))
    assert info.codec == codec and info.duration_s == pytest.approx(2.0, abs=0.03)


@pytest.mark.parametrize("seconds, fps, frames", [(1.0, 25, 25), (1.3, Fraction(30000, 1001), 39), (0.5, 24, 12)])
def test_video_frame_count_is_exact(ffmpeg_exe, tmp_path, seconds, fps, frames):
    path = write_talking_head_video(tmp_path / "v.mp4", seconds, fps, (96, 64), ffmpeg=ffmpeg_exe)
    info = probe_video(path)
    assert count_video_frames(path) == info.frame_count == frames
    assert (info.width, info.height, info.fps, info.codec, info.pix_fmt) == (96, 64, Fraction(fps), "h264", "yuv420p")


def test_motion_and_still(ffmpeg_exe, make_video):
    moving = decode_all(make_video(1.0, 25, (128, 128)), ffmpeg_exe).astype(np.int16)
    still = decode_all(make_video(1.0, 25, (128, 128), motion=False), ffmpeg_exe).astype(np.int16)
    steps = np.abs(np.diff(moving, axis=0)).mean(axis=(1, 2, 3))
    assert steps.min() > 0.3 and steps.max() < 12  # always moving, never jumping
    assert np.abs(np.diff(still, axis=0)).mean() < 0.5


def test_custom_image_and_odd_size(ffmpeg_exe, tmp_path):
    image = np.zeros((40, 60, 3), np.uint8)
    image[:] = (30, 120, 200)
    path = write_talking_head_video(tmp_path / "v.mp4", 0.2, 25, (75, 51), image_bgr=image, ffmpeg=ffmpeg_exe)
    frames = decode_all(path, ffmpeg_exe)
    assert frames.shape == (5, 50, 74, 3)
    assert np.abs(frames.reshape(-1, 3).mean(0) - (30, 120, 200)).max() < 5


def test_video_with_audio(talking_head_video_with_audio):
    assert count_video_frames(talking_head_video_with_audio) == 50
    assert probe_audio(talking_head_video_with_audio).duration_s == pytest.approx(2.0, abs=0.03)
    hidden = [p for p in talking_head_video_with_audio.parent.iterdir() if p.name.startswith(".")]
    assert hidden == []  # the video-only intermediate is gone
