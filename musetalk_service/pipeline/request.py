"""The per-request options, validated once into a frozen object.

The API's JSON schema and the CLI both build a `LipsyncRequest`; phases read it and never write to
it, nor to the loaded models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from musetalk_service.settings import LipsyncDefaults, ParsingMode

FaceBox = tuple[int, int, int, int]
"""A face box in source-frame pixels: (x1, y1, x2, y2), x2/y2 exclusive."""

MIN_FPS, MAX_FPS = 1, 120
"""Output frame rates a request may ask for (below 1 fps the float snap below would round to 0)."""
FPS_MAX_DENOMINATOR = 1001
"""A float fps (29.97) becomes the exact broadcast rational it stands for (30000/1001)."""
MAX_RATE_DENOMINATOR = 1_000_000
"""An exact rate string ("30000/1001") is kept as given, up to this denominator (ffmpeg's rates are int32 pairs)."""


def parse_fps(value: object) -> Fraction:
    """An output frame rate as an exact fraction: a number (snapped to a denominator up to 1001) or
    an exact rate string (`"30000/1001"`, `"25"`), kept as given. ValueError says what is wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Fraction)):
        raise ValueError("must be a number or a rate string such as \"30000/1001\"")
    if isinstance(value, str):
        num, slash, den = value.strip().partition("/")
        if not (num.isascii() and num.isdigit() and (not slash or (den.isascii() and den.isdigit()))) or len(value) > 40:
            raise ValueError(f"must be a number or a rate string such as \"30000/1001\", got {value[:40]!r}")
        if slash and int(den) == 0:
            raise ValueError("the rate's denominator must not be 0")
        rate = Fraction(int(num), int(den) if slash else 1)
        if rate.denominator > MAX_RATE_DENOMINATOR:
            raise ValueError(f"the rate's denominator must be at most {MAX_RATE_DENOMINATOR}")
    elif isinstance(value, Fraction):
        rate = value
    else:
        if not (math.isfinite(value) and MIN_FPS <= value <= MAX_FPS):  # before the snap: 1e-300 would snap to 0
            raise ValueError(f"must be between {MIN_FPS} and {MAX_FPS}")
        rate = Fraction(value).limit_denominator(FPS_MAX_DENOMINATOR)
    if not MIN_FPS <= rate <= MAX_FPS:
        raise ValueError(f"must be between {MIN_FPS} and {MAX_FPS}")
    return rate


@dataclass(frozen=True)
class LipsyncRequest:
    """One lip-sync job: which media, where the result goes, and how to crop and blend."""

    video_path: Path | None
    """The talking-head video; None when `avatar_id` names a prepared one."""
    audio_path: Path
    output_path: Path
    avatar_id: str | None = None
    """A prepared avatar (POST /avatars) instead of `video_path`: its video and options are used."""
    face_box: FaceBox | None = None
    """Skip detection and use this box on every frame (templated avatars; tests with random weights)."""
    fps: Fraction | float | None = None
    """Output frame rate (a Fraction is used exactly, a float snapped by `parse_fps`); unset keeps the video's own rate."""
    batch_size: int = 16
    bbox_shift: int = 0
    extra_margin: int = 10
    parsing_mode: ParsingMode = "jaw"
    left_cheek_width: int = 90
    right_cheek_width: int = 90
    mask_every: int = 5

    @classmethod
    def with_defaults(cls, defaults: LipsyncDefaults, **fields) -> "LipsyncRequest":
        """Fill every option the caller left as None from the configured defaults (paths and ids
        have no default and are taken as given)."""
        merged = defaults.model_dump()
        merged.update({k: v for k, v in fields.items() if v is not None or k not in merged})
        return cls(**merged)
