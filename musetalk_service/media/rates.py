"""The one frame-rate rule: every rate the service computes with is an exact `Fraction`.

A rate arrives as a probed Fraction (the container's, exact: 30000/1001), a request's float from
JSON (29.97), an int, or a string ("24000/1001"). `exact_rate` turns each into the Fraction used
for frame counts, audio windows, the decoder's and the encoder's `-r`, and the avatar key, so
all of them agree to the frame. A float becomes the simplest fraction with a denominator up to
1001 nearest to it: 29.97 is exactly 2997/100 and stays that (it is not 30000/1001, which is
29.97002997...); 30000/1001 as computed in floating point becomes 30000/1001 again.
"""

from __future__ import annotations

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


def output_rate(requested: Rate | None, video_fps: Fraction) -> Fraction:
    """A request's output rate: the one it asks for, else the video's own."""
    return exact_rate(requested) if requested else exact_rate(video_fps)
