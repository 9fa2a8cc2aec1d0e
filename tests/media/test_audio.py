"""Audio decoding to float32 mono at the requested rate, from every container the service accepts."""

from __future__ import annotations

import numpy as np
import pytest

from musetalk_service.errors import BadAudio, InputFileNotFound
from musetalk_service.media.audio import load_audio
from musetalk_service.media.ffmpeg import file_arg, run_ffmpeg
from musetalk_service.media.synth import speech_like_samples


@pytest.mark.parametrize("ext", [".wav", ".mp3", ".m4a", ".ogg", ".opus"])
def test_formats_decode_to_16k_mono(make_audio, ffmpeg_exe, ext):
    samples = load_audio(make_audio(2.0, ext), ffmpeg_exe)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size - 32000) <= 0.01 * 16000  # codec padding is trimmed to within 10 ms
    assert 0.3 < np.abs(samples).max() <= 1.0
    # The lossy codecs keep the signal: the same envelope, voiced parts and pauses where they were.
    reference = speech_like_samples(2.0)
    n = min(samples.size, reference.size)
    env = lambda x: np.convolve(np.abs(x[:n]), np.ones(400) / 400, mode="same")  # noqa: E731
    assert np.corrcoef(env(samples), env(reference))[0, 1] > 0.9


def test_wav_is_sample_exact(speech_wav, ffmpeg_exe):
    samples = load_audio(speech_wav, ffmpeg_exe)
    pcm = (speech_like_samples(2.0) * 32767).astype(np.int16)  # as the WAV stores it
    np.testing.assert_array_equal(samples, pcm / np.float32(32768))
    assert samples.flags.writeable  # callers get their own array, not a view of ffmpeg's bytes


def test_resampling_and_downmix(make_audio, ffmpeg_exe, tmp_path):
    stereo_48k = tmp_path / "stereo_48k.wav"
    run_ffmpeg(ffmpeg_exe, ["-i", file_arg(make_audio(2.0, ".wav")), "-ac", "2", "-ar", "48000", file_arg(stereo_48k)])
    assert load_audio(stereo_48k, ffmpeg_exe).size == 32000
    assert load_audio(stereo_48k, ffmpeg_exe, sample_rate=8000).size == 16000


def test_audio_track_of_a_video(talking_head_video_with_audio, ffmpeg_exe):
    assert abs(load_audio(talking_head_video_with_audio, ffmpeg_exe).size - 32000) <= 160


def test_missing_file(tmp_path, ffmpeg_exe):
    with pytest.raises(InputFileNotFound, match="audio file not found"):
        load_audio(tmp_path / "speech.wav", ffmpeg_exe)


def test_video_without_audio(talking_head_video, ffmpeg_exe):
    with pytest.raises(BadAudio, match=f"{talking_head_video.name} has no audio stream"):
        load_audio(talking_head_video, ffmpeg_exe)


def test_empty_audio(make_audio, ffmpeg_exe):
    with pytest.raises(BadAudio, match="no samples"):
        load_audio(make_audio(0, ".wav"), ffmpeg_exe)


def test_not_audio_at_all(tmp_path, ffmpeg_exe):
    text = tmp_path / "speech.mp3"
    text.write_text("hello\n" * 100)
    with pytest.raises(BadAudio, match="speech.mp3 is not a readable audio file"):
        load_audio(text, ffmpeg_exe)
    empty = tmp_path / "empty.wav"
    empty.touch()
    with pytest.raises(BadAudio, match=r"empty.wav is empty \(0 bytes\)"):
        load_audio(empty, ffmpeg_exe)


@pytest.mark.parametrize("tag, reason", [(0x1234, "Decoder not found"), (0x0055, "Invalid data")])
def test_undecodable_audio(speech_wav, ffmpeg_exe, tmp_path, tag, reason):
    """A WAV header naming an unknown codec, or claiming MP3 over PCM data."""
    data = bytearray(speech_wav.read_bytes())
    data[20:22] = tag.to_bytes(2, "little")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(data)
    with pytest.raises(BadAudio, match=f"bad.wav: the audio stream can't be decoded: {reason}"):
        load_audio(bad, ffmpeg_exe)
