"""The one frame-rate rule: every rate the service computes with is an exact `Fraction`.

A rate arrives as a probed Fraction (the container's, exact: 30000/1001), a request's float from
JSON (29.97), an int, or a string ("24000/1001"). `exact_rate` turns each into the Fraction used
for frame counts, audio windows, the decoder's and the encoder's `-r`, and the avatar key, so
all of them agree to the frame. A float becomes the simplest fraction with a denominator up to
1001 nearest to it: 29.97 is exactly 2997/100 and stays that (it is not 30000/1001, which is
29.97002997...); 30000/1001 as computed in floating point becomes 30000/1001 again.
"""

from __future__ import annotations

import math
from fractions import Fraction

MAX_DENOMINATOR = 1001
"""NTSC's 1001 is the largest denominator real video rates have (30000/1001, 24000/1001)."""

Rate = int | float | str | Fraction


def exact_rate(fps: Rate) -> Fraction:
    """`fps` as a positive Fraction (floats snapped as the module doc says). ValueError if not > 0."""
    if isinstance(fps, Fraction):
        rate = fps
    elif isinstance(fps, float):
        rate = Fraction(fps).limit_denominator(MAX_DENOMINATOR)
    else:
        rate = Fraction(fps)
    if rate <= 0:
        raise ValueError(f"frame rate must be positive, got {fps!r}")
    return rate


SPEECH_SAMPLE_RATE = 16000
"""The rate the speech track is decoded at (whisper's); its sample count fixes the output's length."""


def frame_count(n_samples: int, fps: Rate) -> int:
    """Output video frames for `n_samples` of speech at SPEECH_SAMPLE_RATE: floor(duration * fps).

    The one rule for the output's length: the pipeline counts the decoded samples; a request's
    check, before anything is decoded, the samples its probed duration makes.

    The official code truncates the frame rate with int(fps) before this (29.97 -> 29), while the
    video is written at the real rate, so lips drift about 3 % behind the audio. That is a bug we
    do not copy: the rate is used exactly.
    """
    rate = exact_rate(fps)
    return (n_samples * rate.numerator) // (SPEECH_SAMPLE_RATE * rate.denominator)


def output_rate(requested: Rate | None, video_fps: Fraction) -> Fraction:
    """A request's output rate: the one it asks for, else the video's own."""
    return exact_rate(requested) if requested else exact_rate(video_fps)


MIN_FPS, MAX_FPS = 1, 120
"""Output frame rates a request may ask for (a lip-sync below 1 fps shows nothing; below it a float's snap could reach 0)."""
MAX_RATE_DENOMINATOR = 1_000_000
"""An exact rate string ("30000/1001") is kept as given, up to this denominator (ffmpeg's rates are int32 pairs)."""


def parse_fps(value: object) -> Fraction:
    """A request's output frame rate, checked: a number (snapped as `exact_rate` does) or an exact
    rate string (`"30000/1001"`, `"25"`), kept as given, between MIN_FPS and MAX_FPS. ValueError
    says what is wrong, in words a caller can act on."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Fraction)):
        raise ValueError('must be a number or a rate string such as "30000/1001"')
    if isinstance(value, str):
        num, slash, den = value.strip().partition("/")
        if len(value) > 40 or not (num.isascii() and num.isdigit() and (not slash or (den.isascii() and den.isdigit()))):
            raise ValueError(f'must be a number or a rate string such as "30000/1001", got {value[:40]!r}')
        if slash and int(den) == 0:
            raise ValueError("the rate's denominator must not be 0")
        rate = Fraction(int(num), int(den) if slash else 1)
        if rate.denominator > MAX_RATE_DENOMINATOR:
            raise ValueError(f"the rate's denominator must be at most {MAX_RATE_DENOMINATOR}")
    elif isinstance(value, float) and not (math.isfinite(value) and MIN_FPS <= value <= MAX_FPS):
        # Checked before the snap: 1e-300 would snap to 0.
        raise ValueError(f"must be between {MIN_FPS} and {MAX_FPS}")
    else:
        rate = Fraction(value).limit_denominator(MAX_DENOMINATOR) if isinstance(value, float) else Fraction(value)
    if not MIN_FPS <= rate <= MAX_FPS:
        raise ValueError(f"must be between {MIN_FPS} and {MAX_FPS}")
    return rate
