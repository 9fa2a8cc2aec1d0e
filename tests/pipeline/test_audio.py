"""Audio phase: frame counts at exact rates, window alignment, whisper encoding over 30 s segments."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from musetalk_service.errors import BadAudio
from musetalk_service.media.rates import exact_rate as exact_fps
from musetalk_service.pipeline.audio import AudioFeatures, frame_count


@pytest.mark.parametrize(
    ("n_samples", "fps", "expected"),
    [
        (160_123, 24, 240),  # 10.0077 s
        (160_123, 25, 250),
        (160_123, 29.97, 299),  # int(fps) would give 290
        (160_123, 30, 300),
        (1_600_000, 29.97, 2997),  # 100 s: 100 * 29.97 is 2996.9999... in floats
        (16_000 * 1001, 30000 / 1001, 30000),  # NTSC probed as a float
        (16_000 * 1001, Fraction(30000, 1001), 30000),
        (16_000 * 1001 - 1, Fraction(30000, 1001), 29999),
        (639, 25, 0),  # 39.9 ms: not a whole frame
    ],
)
def test_frame_count(n_samples, fps, expected):
    assert frame_count(n_samples, fps) == expected


def test_exact_fps_snaps_floats():
    assert exact_fps(29.97) == Fraction(2997, 100)
    assert exact_fps(30000 / 1001) == Fraction(30000, 1001)
    assert exact_fps(Fraction(24000, 1001)) == Fraction(24000, 1001)
    with pytest.raises(ValueError):
        exact_fps(0)


def _indexed_frames(n: int, layers: int = 3, dim: int = 4) -> torch.Tensor:
    """Encoder frames whose values say where they came from: 1000 * (frame + 1) + layer."""
    t = torch.arange(n, dtype=torch.float64)[:, None, None]
    layer = torch.arange(layers, dtype=torch.float64)[None, :, None]
    return (1000 * (t + 1) + layer).expand(n, layers, dim).clone()


def test_windows_at_25_fps_cover_80ms_before_to_120ms_after():
    n_samples = 16000 * 2  # 2 s: 100 encoder frames, 50 video frames
    features = AudioFeatures(_indexed_frames(100), n_samples, 25)
    assert features.padding == 2 and features.frame_count == 50
    tokens = features.windows([0, 10, 49]).reshape(3, 10, 3, 4)
    # Frame 0 starts 4 frames before the track: four zero frames, then encoder frames 0..5.
    assert torch.all(tokens[0, :4] == 0)
    assert tokens[0, 4:, :, 0].tolist() == [[1000 * (j + 1) + l for l in range(3)] for j in range(6)]
    # Frame 10 covers encoder frames 16..25, time-major, each with all its layers.
    assert tokens[1, :, :, 0].tolist() == [[1000 * (j + 1) + l for l in range(3)] for j in range(16, 26)]
    # Frame 49 covers 94..103: the last four lie past the track and are zeros.
    assert tokens[2, :6, 0, 0].tolist() == [1000 * (j + 1) for j in range(94, 100)]
    assert torch.all(tokens[2, 6:] == 0)


@pytest.mark.parametrize("fps", [24, 25, 30, 29.97, Fraction(30000, 1001), 60])
def test_windows_match_the_padded_sequence(fps):
    """Gathering with implicit zeros equals slicing the official explicitly padded sequence.

    At 60 fps the official 6 * padding trailing zeros are too few for the last windows (it asserts
    and exits); we return zeros there, so the oracle pads 10 more.
    """
    n_samples = 16000 * 3 + 77
    n = n_samples // 320
    frames = _indexed_frames(n)
    features = AudioFeatures(frames, n_samples, fps)
    rate = exact_fps(fps)
    pad = int(np.ceil(float(50 / rate)))
    zeros = torch.zeros(8 * pad + 10, 3, 4, dtype=frames.dtype)
    padded = torch.cat([zeros[: 2 * pad], frames, zeros[2 * pad :]])
    indices = np.arange(features.frame_count)
    windows = features.windows(indices[::-1])  # order is the caller's
    for row, i in enumerate(indices[::-1]):
        start = int(Fraction(int(i)) * 50 / rate)  # floor of the exact start
        expected = padded[start : start + 10].reshape(30, 4)
        assert torch.equal(windows[row], expected), f"frame {i}"


def test_windows_reject_frames_past_the_audio():
    features = AudioFeatures(_indexed_frames(100), 16000 * 2, 25)
    with pytest.raises(IndexError):
        features.windows([50])
    with pytest.raises(IndexError):
        features.windows([-1])
    assert features.windows([]).shape == (0, 30, 4)


def test_encoder_gives_all_hidden_states(tiny_bundle):
    samples = np.random.default_rng(0).normal(0, 0.1, 16000 * 2 + 100).astype(np.float32)
    features = AudioFeatures.from_samples(tiny_bundle, samples, 25)
    layers = tiny_bundle.whisper.config.encoder_layers + 1
    dim = tiny_bundle.whisper.config.d_model
    assert features.encoder_frames.shape == (100, layers, dim)
    assert features.encoder_frames.dtype == tiny_bundle.dtype
    assert features.encoder_frames.device == tiny_bundle.device
    assert features.tokens_per_frame == 10 * layers
    assert features.windows([0, 49]).shape == (2, 10 * layers, dim)


def test_long_audio_is_encoded_per_30s_segment_and_trimmed(tiny_bundle):
    rng = np.random.default_rng(1)
    n_samples = 16000 * 65 + 1000  # three segments, the last 5.06 s long
    samples = rng.normal(0, 0.1, n_samples).astype(np.float32)
    features = AudioFeatures.from_samples(tiny_bundle, samples, 25)
    assert features.encoder_frames.shape[0] == n_samples // 320 == 3253

    # The oracle: each segment through the extractor and the encoder on its own.
    expected = []
    for start in range(0, n_samples, 480_000):
        segment = samples[start : start + 480_000]
        mel = tiny_bundle.feature_extractor(segment, sampling_rate=16000, return_tensors="pt").input_features
        with torch.inference_mode():
            hidden = tiny_bundle.whisper(input_features=mel, output_hidden_states=True).hidden_states
        expected.append(torch.stack(hidden, dim=2)[0])
    expected = torch.cat(expected)[:3253]
    torch.testing.assert_close(features.encoder_frames, expected, rtol=1e-4, atol=1e-4)


def test_too_short_audio_is_rejected(tiny_bundle):
    with pytest.raises(BadAudio):
        AudioFeatures.from_samples(tiny_bundle, np.zeros(100, np.float32), 25)
