"""What a finished lip-sync returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

PHASES = ("read", "face_detect", "vae_encode", "audio", "unet", "blend", "encode", "mux")
"""Timed phases, in pipeline order. `face_detect` is the face phase: the boxes and the faces cut
from them for the VAE; `vae_encode` the VAE encoder alone; `unet` the UNet plus the VAE decode."""


@dataclass(frozen=True)
class LipsyncResult:
    output_path: Path
    frames: int
    fps: float
    duration_s: float
    encoder: str
    weights: str
    timings: dict[str, float]
    """Seconds per phase (keys in PHASES) plus `total`, the request's wall time."""
    fallbacks: int = 0
    """Frames whose fast blend failed and were recomputed the slow way."""
    frames_without_face: int = 0
    """Output frames passed through unchanged because their source frame had no face."""
    frames_generated: int = 0
    """Output frames whose mouth was generated (UNet + VAE decode + blend), cross-fades included."""
    frames_silent: int = 0
    """Output frames passed through as silent (`silence: source`): nothing generated for them."""
    avatar_id: str | None = None
    """The prepared video this output was made from: name it in later requests to skip preparing."""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["output_path"] = str(self.output_path)
        return out
