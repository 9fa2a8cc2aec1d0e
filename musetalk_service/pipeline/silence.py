"""Silence in the speech track: which output frames get a generated mouth, and by how much.

With the request option `silence: source`, an output frame whose audio is silent shows its
source frame as it is (the template's own resting mouth), and nothing is generated for it: no
UNet, no VAE decode, no blend. MuseTalk's generated mouth keeps twitching where nobody speaks, and
a TTS track has pauses between sentences and silent heads and tails.

The decision is data, made once per request (`SilencePlan`): a weight per output frame, 1 where
the mouth is generated, 0 where the source frame passes through, and in between over a few frames
at each boundary, where the compositors scale the blend mask by the weight (a cross-fade from the
generated mouth to the source's, so there is no pop). The fades lie inside the silence: every
frame of speech is generated as it would be without the option, and the frames just before an
onset, whose audio windows already hear the speech (MuseTalk looks 120 ms ahead), fade in.

Silence is found from the 16 kHz samples by energy, pure numpy (`speech_activity`):

- levels: the mean power of each 10 ms hop, in dB relative to full scale;
- the track's own level: the 95th percentile of the hops above `floor_dbfs`, so the thresholds
  follow the recording: a hop is speech above `level + threshold_db` (default -40 dB) and stays
  speech, once it is, until it falls below that less `hysteresis_db` (the hysteresis: a voice
  fading between the two keeps its state instead of flickering). A quiet but voiced passage 30 dB
  under the loudest speech is still speech;
- below `floor_dbfs` (default -60 dBFS) a hop is silent whatever the track's level (digital
  silence, dither, a quiet room): a track of that alone is all silence;
- silent runs shorter than `min_silence_s` (default 0.3 s) are speech: the gaps between
  syllables and words keep generating.

Why not a packaged VAD: webrtcvad(-wheels) is a GMM on absolute levels, with no hysteresis,
minimum length or track-relative threshold (those would still be ours), and it calls breathy or
quiet speech noise and low noise speech by its own fixed tuning; silero-vad is a neural network
(a model file, torch or onnxruntime). What we need to find is a speaker at rest, not speech in
noise: the level rule is exact for TTS and studio tracks, costs a few ms per minute of audio,
and fails safe: a noisy recording whose noise stays within 40 dB of its speech is all speech,
today's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

HOP_S = 0.01
"""Length of one level measurement: 10 ms (a pitch period or more of any voice above 100 Hz)."""
LEVEL_PERCENTILE = 95.0
"""The track's level: this percentile of its hop levels above the floor (its loud speech)."""
_TINY_POWER = 1e-20
"""Added to the power before the log: digital silence is -200 dB, not -inf."""


@dataclass(frozen=True)
class SilenceRule:
    """The detector's thresholds (`settings.SilenceSettings` holds the configured ones)."""

    threshold_db: float = -40.0
    """Speech starts above the track's level plus this (dB, negative)."""
    hysteresis_db: float = 6.0
    """Speech ends only below the start threshold less this (dB)."""
    floor_dbfs: float = -60.0
    """Below this level (dB relative to full scale) a hop is silent whatever the track's level."""
    min_silence_s: float = 0.3
    """Silent runs shorter than this are speech (pauses between syllables and words)."""


def hop_levels_db(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mean power of each `HOP_S` hop of `samples` (float, full scale 1.0) in dBFS, `[ceil(n / hop)]`;
    a last, partial hop is padded with zeros."""
    hop = round(HOP_S * sample_rate)
    n_hops = -(-len(samples) // hop)
    padded = np.zeros(n_hops * hop, dtype=np.float64)
    padded[: len(samples)] = samples
    power = np.mean(padded.reshape(n_hops, hop) ** 2, axis=1)
    return 10 * np.log10(power + _TINY_POWER)


def speech_activity(samples: np.ndarray, sample_rate: int, rule: SilenceRule = SilenceRule()) -> np.ndarray:
    """Per `HOP_S` hop of `samples`, whether it is speech (True) or silence (False); see the module doc.

    `samples`: mono float, full scale 1.0 (as `media.audio.load_audio` gives them).
    """
    levels = hop_levels_db(np.asarray(samples, dtype=np.float64), sample_rate)
    audible = levels > rule.floor_dbfs
    if not audible.any():
        return np.zeros(len(levels), dtype=bool)
    track_level = float(np.percentile(levels[audible], LEVEL_PERCENTILE))
    start = max(track_level + rule.threshold_db, rule.floor_dbfs + rule.hysteresis_db)
    speech = _hysteresis(levels, start=start, stop=start - rule.hysteresis_db)
    return _fill_short_silences(speech, round(rule.min_silence_s / HOP_S))


def _hysteresis(levels: np.ndarray, *, start: float, stop: float) -> np.ndarray:
    """True from each hop above `start` until the next hop below `stop`; the track starts silent.

    Vectorised: each hop takes the state of the last hop that crossed a threshold (forward fill).
    """
    crossing = np.where(levels > start, 1, np.where(levels < stop, -1, 0))
    positions = np.arange(len(levels))
    last = np.maximum.accumulate(np.where(crossing != 0, positions, -1))
    return (last >= 0) & (crossing[np.maximum(last, 0)] > 0)


def _fill_short_silences(speech: np.ndarray, min_hops: int) -> np.ndarray:
    """`speech` with every silent run shorter than `min_hops` turned to speech."""
    out = speech.copy()
    for first, end in _runs(~speech):
        if end - first < min_hops:
            out[first:end] = True
    return out


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) of each run of True in `flags`, end exclusive."""
    edges = np.diff(np.concatenate([[False], flags, [False]]).astype(np.int8))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def frame_speech(activity: np.ndarray, sample_rate: int, fps: Fraction, n_frames: int) -> np.ndarray:
    """Per output frame, whether any `HOP_S` hop its time span `[i / fps, (i + 1) / fps)` touches
    is speech: a frame is silent only when all of its audio is. Exact integer sample arithmetic."""
    hop = round(HOP_S * sample_rate)
    index = np.arange(n_frames + 1, dtype=np.int64)
    bounds = index * sample_rate * fps.denominator  # frame edges in samples, times fps.numerator
    first_hop = bounds[:-1] // (fps.numerator * hop)
    end_hop = -(-bounds[1:] // (fps.numerator * hop))
    spoken = np.concatenate([[0], np.cumsum(activity, dtype=np.int64)])
    end_hop = np.minimum(end_hop, len(activity))
    return spoken[end_hop] - spoken[np.minimum(first_hop, end_hop)] > 0


def fade_weights(speech: np.ndarray, fade_frames: int) -> np.ndarray:
    """float32 weights per frame: 1 on speech frames; on silent ones 1 - d / (fade_frames + 1) at
    distance d (in frames) from the nearest speech frame, and 0 from d = fade_frames + 1 on; all 0
    without speech. The fade steps down monotonically into each silence and back up out of it."""
    n = len(speech)
    if not speech.any():
        return np.zeros(n, dtype=np.float32)
    positions = np.arange(n)
    before = np.maximum.accumulate(np.where(speech, positions, -n - fade_frames - 1))
    after = np.minimum.accumulate(np.where(speech, positions, 2 * n + fade_frames + 1)[::-1])[::-1]
    distance = np.minimum(positions - before, after - positions)
    return np.clip(1 - distance / (fade_frames + 1), 0, 1).astype(np.float32)


@dataclass(frozen=True)
class SilencePlan:
    """Per output frame of one request, how much of the generated mouth it shows (`weights`:
    1 generated, 0 the source frame as it is, in between a cross-fade). Frames of weight 0 are
    never generated; `generates` says whether any frame is."""

    weights: np.ndarray
    """float32 `[n_frames]`."""

    @classmethod
    def generate_all(cls, n_frames: int) -> "SilencePlan":
        """Every frame generated (`silence: generate`, today's behaviour)."""
        return cls(np.ones(n_frames, dtype=np.float32))

    @classmethod
    def from_samples(
        cls, samples: np.ndarray, sample_rate: int, fps: Fraction, n_frames: int, rule: SilenceRule, fade_frames: int
    ) -> "SilencePlan":
        """The plan of `silence: source`: silent frames from `speech_activity`, faded over `fade_frames`."""
        speech = frame_speech(speech_activity(samples, sample_rate, rule), sample_rate, fps, n_frames)
        return cls(fade_weights(speech, fade_frames))

    @property
    def silent_frames(self) -> int:
        """Frames that show their source frame as it is (weight 0)."""
        return int(np.count_nonzero(self.weights == 0))

    @property
    def generates(self) -> bool:
        return self.silent_frames < len(self.weights)
