"""Audio phase: whisper-tiny encoder features for the whole track, then one window per output frame.

MuseTalk conditions each output frame on 10 consecutive whisper encoder frames (200 ms at 50 Hz)
around the frame's time, taken from every hidden state of the encoder (embeddings plus each layer)
and flattened time-major into `10 * L` tokens of `D` dimensions (50 x 384 for whisper-tiny).

Only the encoder frames are kept (`[n, L, D]`, about 0.4 MB per second of audio in fp16); windows
are gathered per batch of output frames, because materialising all of them up front costs 5x the
memory and is what made the official code run out of GPU memory on long audio.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from musetalk_service.errors import BadAudio
from musetalk_service.media.rates import SPEECH_SAMPLE_RATE, exact_rate, frame_count

logger = logging.getLogger(__name__)

SAMPLE_RATE = SPEECH_SAMPLE_RATE
SEGMENT_SAMPLES = 30 * SAMPLE_RATE
"""Whisper's fixed input: 30 s segments, each encoded on its own (no context crosses a boundary)."""
ENCODER_FPS = 50
"""Whisper encoder frames per second (one per 20 ms)."""
SAMPLES_PER_ENCODER_FRAME = SAMPLE_RATE // ENCODER_FPS
WINDOW = 10
"""Encoder frames per output frame: 2 * (pad_left + pad_right + 1) with the official pads of 2."""
SEGMENTS_PER_BATCH = 8
"""30 s segments per encoder forward pass (a few MB of activations each for whisper-tiny)."""

Fps = float | Fraction


class AudioFeatures:
    """Whisper encoder features of one audio track, on the model device in the model dtype.

    Build it with `AudioFeatures.from_samples`; then `windows(indices)` gives the UNet's audio
    tokens for any batch of output frames, in any order (ping-pong playback needs no special case).
    """

    def __init__(self, encoder_frames: torch.Tensor, n_samples: int, fps: Fps):
        """`encoder_frames` is `[n, L, D]`: n encoder frames (50 per second), L hidden states."""
        if encoder_frames.ndim != 3:
            raise ValueError(f"encoder frames must be [n, L, D], got {tuple(encoder_frames.shape)}")
        self.encoder_frames = encoder_frames
        self.n_samples = n_samples
        self.fps = exact_rate(fps)
        # Window starts and padding in exact integer arithmetic on the real rate (not int(fps)).
        self._mult_num = ENCODER_FPS * self.fps.denominator
        self._mult_den = self.fps.numerator
        self.padding = -(-self._mult_num // self._mult_den)
        """ceil(50 / fps): the official zero padding unit (2 at 25 fps), fixed upstream from floor."""

    @classmethod
    def from_samples(cls, models: Any, samples: np.ndarray, fps: Fps) -> "AudioFeatures":
        """Encode 16 kHz mono float32 samples with the bundle's whisper encoder.

        The audio is cut into 30 s segments; each gets its own log-mel features (padded to 30 s by
        the feature extractor) and several segments share one encoder pass. All hidden states are
        stacked per encoder frame, the segments concatenated, and the result trimmed to
        floor(duration * 50) frames, which drops the encoder frames of the padding.
        """
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples [n], got shape {samples.shape}")
        n_samples = int(samples.size)
        if n_samples < SAMPLES_PER_ENCODER_FRAME:
            raise BadAudio(f"the audio is {n_samples} samples long; at least 20 ms (320 samples at 16 kHz) is needed")
        segments = [samples[i : i + SEGMENT_SAMPLES] for i in range(0, n_samples, SEGMENT_SAMPLES)]
        parts = [
            _encode_segments(models, segments[i : i + SEGMENTS_PER_BATCH])
            for i in range(0, len(segments), SEGMENTS_PER_BATCH)
        ]
        encoder_frames = torch.cat(parts, dim=0)[: n_samples // SAMPLES_PER_ENCODER_FRAME]
        logger.debug(
            "audio: %d samples, %d segments -> encoder frames %s",
            n_samples,
            len(segments),
            tuple(encoder_frames.shape),
        )
        return cls(encoder_frames, n_samples, fps)

    @property
    def frame_count(self) -> int:
        """Output frames this audio drives at `fps`."""
        return frame_count(self.n_samples, self.fps)

    @property
    def tokens_per_frame(self) -> int:
        """10 * L: the UNet's cross-attention sequence length (50 for whisper-tiny)."""
        return WINDOW * self.encoder_frames.shape[1]

    def windows(self, frame_indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Audio tokens `[b, 10 * L, D]` for output frames `frame_indices`.

        Frame i takes the 10 encoder frames starting at a = floor(i * 50 / fps) in a sequence that
        the official code pads with 2 * padding zero frames in front (and 6 * padding behind). So
        it covers original encoder frames
        a - 2 * padding .. a - 2 * padding + 9, with zeros where that range leaves the track; at
        25 fps that is 80 ms before the frame's start to 120 ms after it. The padding is never
        materialised: indices outside the track are gathered as zeros. Tokens are ordered
        time-major, token = L * t + layer, which is the order the positional encoding assumes.
        """
        index = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.frame_count):
            raise IndexError(
                f"output frame indices must lie in [0, {self.frame_count}), got {index.min()}..{index.max()}"
            )
        n, layers, dim = self.encoder_frames.shape
        starts = index * self._mult_num // self._mult_den - 2 * self.padding
        source = starts[:, None] + np.arange(WINDOW, dtype=np.int64)[None, :]
        inside = (source >= 0) & (source < n)
        device = self.encoder_frames.device
        gathered = self.encoder_frames[torch.from_numpy(np.clip(source, 0, n - 1)).to(device)]
        gathered = gathered * torch.from_numpy(inside).to(device=device, dtype=gathered.dtype)[:, :, None, None]
        return gathered.reshape(index.size, WINDOW * layers, dim)


def _encode_segments(models: Any, segments: list[np.ndarray]) -> torch.Tensor:
    """Encode up to SEGMENTS_PER_BATCH segments in one pass -> `[len(segments) * 1500, L, D]`."""
    features = models.feature_extractor(segments, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    features = features.to(device=models.device, dtype=models.dtype)
    with torch.inference_mode():
        hidden = models.whisper(input_features=features, output_hidden_states=True).hidden_states
        stacked = torch.stack(hidden, dim=2)
    batch, frames, layers, dim = stacked.shape
    return stacked.reshape(batch * frames, layers, dim)
