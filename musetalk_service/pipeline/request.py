"""The per-request options, validated once into a frozen object.

The API's JSON schema and the CLI both build a `LipsyncRequest`; phases read it and never write to
it, nor to the loaded models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from musetalk_service.settings import LipsyncDefaults, ParsingMode, SilenceMode

FaceBox = tuple[int, int, int, int]
"""A face box in source-frame pixels: (x1, y1, x2, y2), x2/y2 exclusive."""


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
    fps: float | None = None
    """Output frame rate; unset keeps the video's own rate (as a float, never truncated)."""
    batch_size: int = 16
    bbox_shift: int = 0
    extra_margin: int = 10
    parsing_mode: ParsingMode = "jaw"
    left_cheek_width: int = 90
    right_cheek_width: int = 90
    mask_every: int = 5
    silence: SilenceMode = "generate"
    """Silent frames: `generate` a mouth, or show the `source` frame as it is (pipeline/silence.py)."""

    @classmethod
    def with_defaults(cls, defaults: LipsyncDefaults, **fields) -> "LipsyncRequest":
        """Fill every option the caller left as None from the configured defaults (paths and ids
        have no default and are taken as given)."""
        merged = defaults.model_dump()
        merged.update({k: v for k, v in fields.items() if v is not None or k not in merged})
        return cls(**merged)
