"""Synthetic but realistic-shaped media for tests, the `demo` command and the benchmark.

Nothing is downloaded: the face is scikit-image's astronaut photo (a real face that detectors
find), the speech is synthesized. Output is deterministic for given arguments.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import wave
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from musetalk_service.media.encode import VideoEncoder, encoder_for
from musetalk_service.media.ffmpeg import FFmpegPipe, file_arg, find_ffmpeg
from musetalk_service.media.rates import exact_rate
from musetalk_service.media.mux import mux_audio
from musetalk_service.settings import EncodeSettings

logger = logging.getLogger(__name__)

# (F1, F2, F3) in Hz of five vowels, roughly /a/ /i/ /u/ /e/ /o/ of an adult male voice.
_VOWEL_FORMANTS = np.array(
    [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)], dtype=np.float64
)
_FORMANT_BANDWIDTHS = np.array([90.0, 110.0, 170.0])

_AUDIO_CODECS = {
    ".mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
    ".m4a": ["-c:a", "aac", "-b:a", "96k"],
    ".ogg": ["-c:a", "libvorbis", "-q:a", "4"],
    ".opus": ["-c:a", "libopus", "-b:a", "48k"],
    ".flac": ["-c:a", "flac"],
}
"""Extensions `write_speech_like_audio` transcodes to (besides .wav, written directly)."""

_FRAMES_PER_WRITE = 32
_ASTRONAUT_FACE = (0.46, 0.28)  # where the face is in astronaut.png, kept in frame by crops


def speech_like_samples(
    seconds: float, sample_rate: int = 16000, seed: int = 0, pause_s: tuple[float, float] = (0.2, 0.6)
) -> np.ndarray:
    """Voiced, vowel-like sound as float32 mono in [-1, 1].

    A glottal pulse train (its harmonics, falling 6 dB/octave, at a gliding pitch around 120 Hz)
    shaped by three formant resonances that change vowel every syllable; syllables of 0.12-0.3 s
    with smooth onsets, grouped in phrases of 2-6 separated by pauses of `pause_s` (0.2-0.6 s),
    so there is loud voiced sound to open a mouth to and true silence between phrases.
    """
    n = round(seconds * sample_rate)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sample_rate
    envelope = np.zeros(n)
    formants = np.tile(_VOWEL_FORMANTS[0][:, None], (1, n))
    pos = round(0.15 * sample_rate)  # a short lead-in of silence, as in real recordings
    while pos < n:
        for _ in range(rng.integers(2, 7)):
            length = round(rng.uniform(0.12, 0.30) * sample_rate)
            end = min(pos + length, n)
            envelope[pos:end] = np.hanning(length)[: end - pos] * rng.uniform(0.6, 1.0)
            formants[:, pos:end] = _VOWEL_FORMANTS[rng.integers(len(_VOWEL_FORMANTS))][:, None]
            pos = end + round(rng.uniform(0.01, 0.05) * sample_rate)
            if pos >= n:
                break
        pos += round(rng.uniform(*pause_s) * sample_rate)

    f0 = 120 + 12 * np.sin(2 * np.pi * 0.7 * t) + 6 * np.sin(2 * np.pi * 5.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = np.zeros(n)
    # Harmonics up to 5 kHz (or just below Nyquist): the band that carries speech.
    for k in range(1, int(min(0.45 * sample_rate, 5000) / f0.min()) + 1):
        freq = k * f0
        # Each harmonic's gain through the formant filter: a sum of resonance peaks, plus a floor.
        gain = 0.02 + sum(1.0 / (1.0 + ((freq - formants[i]) / (_FORMANT_BANDWIDTHS[i] / 2)) ** 2) for i in range(3))
        voice += gain / k * np.sin(k * phase)
    voice += 0.02 * rng.standard_normal(n)  # breath noise
    signal = voice * envelope
    peak = np.abs(signal).max()
    return (signal * (0.6 / peak) if peak > 0 else signal).astype(np.float32)


def speech_with_silences(
    seconds: float, silent_share: float, sample_rate: int = 16000, seed: int = 0, gap_s: float = 1.5
) -> np.ndarray:
    """`seconds` of sentences of speech-like sound (`speech_like_samples` whose pauses are all
    shorter than 0.3 s) separated by gaps of digital silence of about `gap_s`, the gaps making
    `silent_share` of the whole (the pauses of a TTS track between sentences, its silent head and
    tail): float32 mono. The track starts and ends with speech."""
    if not 0 <= silent_share < 1:
        raise ValueError(f"silent_share must be in [0, 1), got {silent_share}")
    n = round(seconds * sample_rate)
    gaps = round(silent_share * seconds / gap_s)
    silent = round(silent_share * n)
    speech = speech_like_samples((n - silent) / sample_rate, sample_rate, seed, pause_s=(0.05, 0.15))
    if gaps == 0:
        return speech
    out = np.zeros(n, dtype=np.float32)
    cuts = np.linspace(0, len(speech), gaps + 2).round().astype(int)  # gaps + 1 sentences
    gap_edges = np.linspace(0, silent, gaps + 1).round().astype(int)
    for k in range(gaps + 1):
        start = cuts[k] + gap_edges[k]
        out[start : start + cuts[k + 1] - cuts[k]] = speech[cuts[k] : cuts[k + 1]]
    return out


def write_audio(path: str | os.PathLike, samples: np.ndarray, sample_rate: int = 16000, ffmpeg: str | None = None) -> Path:
    """Write float mono `samples` (full scale 1.0, clipped) to `path`: 16-bit mono WAV for .wav
    (the stdlib `wave` module), else transcoded by ffmpeg (.mp3 .m4a .ogg .opus .flac)."""
    out = Path(path)
    ext = out.suffix.lower()
    if ext != ".wav" and ext not in _AUDIO_CODECS:
        raise ValueError(f"unsupported audio extension {ext!r}: use .wav or one of {sorted(_AUDIO_CODECS)}")
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    if ext == ".wav":
        with wave.open(str(out), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.writeframes(pcm.tobytes())
        return out
    args = ["-f", "s16le", "-ar", str(sample_rate), "-ac", "1", "-i", "pipe:0", *_AUDIO_CODECS[ext], file_arg(out)]
    with FFmpegPipe(ffmpeg or find_ffmpeg(), args, stdin=True, what=f"writing {out}") as proc:
        proc.write(pcm)
    return out


def write_speech_like_audio(
    path: str | os.PathLike, seconds: float, sample_rate: int = 16000, ffmpeg: str | None = None, seed: int = 0
) -> Path:
    """Write `speech_like_samples` to `path` as `write_audio` does. `seconds` may be 0 (an
    empty but valid WAV, for error tests)."""
    return write_audio(path, speech_like_samples(seconds, sample_rate, seed), sample_rate, ffmpeg)


@functools.lru_cache(maxsize=1)
def _astronaut_bgr() -> np.ndarray:
    from skimage.data import astronaut  # local: scikit-image is slow to import

    image = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR)
    image.flags.writeable = False
    return image


def _cover(image: np.ndarray, width: int, height: int, focus: tuple[float, float]) -> np.ndarray:
    """Resize `image` to fill width x height without distortion, cropping the overflow around
    `focus` (x, y as fractions of the image)."""
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    resized = cv2.resize(
        image, (max(width, round(w * scale)), max(height, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    rh, rw = resized.shape[:2]
    x0 = min(max(round(focus[0] * rw - width / 2), 0), rw - width)
    y0 = min(max(round(focus[1] * rh - height / 2), 0), rh - height)
    return resized[y0 : y0 + height, x0 : x0 + width]


def talking_head_frames(
    count: int, fps: Fraction | float, size: tuple[int, int], image_bgr: np.ndarray | None = None, motion: bool = True
):
    """Yield `count` BGR frames `[H, W, 3]` of `image_bgr` (default: the astronaut) filling `size`
    (w, h), with slow, smooth sinusoidal pan, zoom and tilt when `motion` (a few percent, like a
    speaker's head)."""
    width, height = size
    if image_bgr is None:
        base = _cover(_astronaut_bgr(), width, height, _ASTRONAUT_FACE)
    else:
        base = _cover(image_bgr, width, height, (0.5, 0.5))
    centre = (width / 2, height / 2)
    for i in range(count):
        if not motion:
            yield base.copy()
            continue
        t = i / float(fps)
        zoom = 1.04 + 0.03 * np.sin(2 * np.pi * 0.31 * t)
        angle = 2.0 * np.sin(2 * np.pi * 0.17 * t)
        matrix = cv2.getRotationMatrix2D(centre, angle, zoom)
        matrix[0, 2] += 0.02 * width * np.sin(2 * np.pi * 0.23 * t)
        matrix[1, 2] += 0.015 * height * np.sin(2 * np.pi * 0.29 * t + 1.0)
        yield cv2.warpAffine(base, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)


def write_talking_head_video(
    path: str | os.PathLike,
    seconds: float,
    fps: Fraction | float = 25,
    size: tuple[int, int] = (256, 256),
    image_bgr: np.ndarray | None = None,
    motion: bool = True,
    ffmpeg: str | None = None,
    audio_path: str | os.PathLike | None = None,
) -> Path:
    """Write an H.264 yuv420p MP4 of `talking_head_frames` with exactly round(seconds * fps)
    frames at `fps` (kept exact: pass Fraction(30000, 1001) for 29.97).

    `size` is (w, h); odd sides come out one pixel smaller (`encode.even_size`). With
    `audio_path`, that audio is muxed in (copied or AAC, as `mux.mux_audio` does).
    """
    ffmpeg = ffmpeg or find_ffmpeg()
    out = Path(path)
    fps = exact_rate(fps)
    count = round(seconds * fps)
    target = out.with_name(f".{out.name}.video.mp4") if audio_path is not None else out
    choice = encoder_for("libx264", EncodeSettings())
    with VideoEncoder(target, size[0], size[1], fps, choice, ffmpeg) as encoder:
        frames = talking_head_frames(count, fps, size, image_bgr, motion)
        while batch := list(itertools.islice(frames, _FRAMES_PER_WRITE)):
            encoder.write(np.stack(batch))
    if audio_path is not None:
        try:
            mux_audio(target, audio_path, out, ffmpeg)
        finally:
            target.unlink(missing_ok=True)
    logger.debug("wrote %s: %d frames at %s fps, %dx%d", out, count, fps, *size)
    return out
