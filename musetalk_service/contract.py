"""What crosses the line between the API and the engine: plain records and the `Engine` protocol.

The API (`api/`) checks a request (paths, limits, one probe per input file) into a task, hands it to
an `Engine` and gets a result back; it never sees a tensor. The engine in this process is
`pipeline.engine.LipsyncPipeline`; a GPU replica in another process (Ray Serve) implements the same
protocol. So everything here is a frozen dataclass of plain values (str, int, float, Path,
Fraction, tuples, the probe's `VideoInfo`/`AudioInfo`) that pickles as it is, and progress and
cancellation go through two one-method protocols instead of callbacks into this process.

Imports: the standard library, `errors`, `settings` (pydantic, for the defaults' type) and
`media.probe` (PyAV) only: no torch, no cv2.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from musetalk_service.media.probe import AudioInfo, VideoInfo
from musetalk_service.settings import LipsyncDefaults, ParsingMode, SilenceMode

__all__ = [
    "PHASES",
    "AudioInfo",
    "AvatarSummary",
    "CancelToken",
    "Engine",
    "EngineHealth",
    "FaceBox",
    "is_avatar_id",
    "GpuMemory",
    "LipsyncRequest",
    "LipsyncResult",
    "LipsyncTask",
    "NeverCancelled",
    "NoProgress",
    "PhaseTimings",
    "PrepareTask",
    "ProgressSink",
    "VideoInfo",
]

FaceBox = tuple[int, int, int, int]
"""A face box in source-frame pixels: (x1, y1, x2, y2), x2/y2 exclusive."""

AVATAR_ID_HEX = 32
"""An avatar id is its cache key: this many lowercase hex digits (128 bits of sha256)."""
_AVATAR_ID = re.compile(rf"^[0-9a-f]{{{AVATAR_ID_HEX}}}$")


def is_avatar_id(value: object) -> bool:
    """Whether `value` has the form of an avatar id (also what keeps ids from naming other paths)."""
    return isinstance(value, str) and _AVATAR_ID.match(value) is not None

PHASES = ("read", "face_detect", "vae_encode", "parse", "audio", "unet", "blend", "encode", "mux")
"""Timed phases, in pipeline order. `face_detect` is the face phase: the boxes and the faces cut
from them for the VAE; `vae_encode` the VAE encoder alone; `parse` BiSeNet's blend masks of a new
video; `unet` the UNet plus the VAE decode; `blend` pasting the generated faces back."""

PhaseTimings = dict[str, float]
"""Seconds per phase (keys in PHASES) plus `total`, the wall time of the request in the engine."""


# --- requests and tasks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LipsyncRequest:
    """One lip-sync job: which media, where the result goes, and how to crop and blend.

    The API's body and the CLI both build one; the engine reads it and never writes to it, nor to
    the loaded models.
    """

    video_path: Path | None
    """The talking-head video; None when `avatar_id` names a prepared one."""
    audio_path: Path
    output_path: Path
    avatar_id: str | None = None
    """A prepared avatar (POST /avatars) instead of `video_path`: its video and options are used."""
    face_box: FaceBox | None = None
    """Skip detection and use this box on every frame (templated avatars; tests with random weights)."""
    fps: float | Fraction | None = None
    """Output frame rate; unset keeps the video's own rate (`media.rates.output_rate` makes it exact)."""
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
    def with_defaults(cls, defaults: LipsyncDefaults, **fields: Any) -> LipsyncRequest:
        """Fill every option the caller left as None from the configured defaults (paths and ids
        have no default and are taken as given). The one way request defaults are resolved."""
        merged = defaults.model_dump()
        merged.update({k: v for k, v in fields.items() if v is not None or k not in merged})
        return cls(**merged)


@dataclass(frozen=True)
class AvatarSummary:
    """A prepared avatar's facts (POST /avatars returns one, GET /avatars lists them)."""

    avatar_id: str
    video: Path
    """The video it was prepared from, as the engine sees it (clients are shown its name only)."""
    frame_count: int
    fps: Fraction
    width: int
    height: int
    faces: int
    """Source frames with a face box."""
    masks: int
    created_at: float
    bytes: int
    """In memory (latents + masks)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The preparation options, canonical (what its id was derived from)."""
    in_memory: bool | None = None
    """Cache tiers and use, where the summary comes from the cache's listing (None otherwise)."""
    on_disk: bool | None = None
    disk_bytes: int | None = None
    last_used: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON for clients: fps as "n/d", the video's file name only, unset tier fields left out."""
        row = asdict(self)
        row["fps"] = f"{self.fps.numerator}/{self.fps.denominator}"
        row["video"] = self.video.name
        return {k: v for k, v in row.items() if v is not None}


@dataclass(frozen=True)
class LipsyncTask:
    """A checked lip-sync request: what the engine runs. Built by the API's check (or
    `pipeline.engine.check_task` for the CLI and bench), which probed each input once."""

    request: LipsyncRequest
    video: VideoInfo
    """The probed video: the request's, or the named avatar's."""
    audio: AudioInfo
    avatar: AvatarSummary | None = None
    """The avatar `request.avatar_id` names, as found by the check."""
    job_id: str | None = None
    frames: int = 0
    """The output frames the check counted (the job's `frames_total` from submission); 0 if unknown."""
    warnings: tuple[str, ...] = ()
    """What the lip-sync will change unasked (odd size cropped, fps resampled, audio re-encoded,
    video cycled), as found by the check (`media.adjustments`): the result carries them."""


@dataclass(frozen=True)
class PrepareTask:
    """A checked avatar preparation: the video and the preparation options of `request`
    (its `audio_path` and `output_path` are unused)."""

    request: LipsyncRequest
    video: VideoInfo
    job_id: str | None = None


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LipsyncResult:
    """What a finished lip-sync returns."""

    output_path: Path
    frames: int
    fps: float
    duration_s: float
    encoder: str
    weights: str
    timings: PhaseTimings
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
    """What the service changed unasked (the task's warnings), one sentence each."""

    def with_warnings(self, warnings: Sequence[str]) -> LipsyncResult:
        """This result with `warnings` (the checked task's) ahead of its own."""
        return replace(self, warnings=[*warnings, *self.warnings])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["output_path"] = str(self.output_path)
        return out


@dataclass(frozen=True)
class EngineHealth:
    device: str
    """torch's name of the device the models run on ("cuda:0", "cpu")."""
    weights: str
    """`random`, `official` or `custom`."""
    encoder: str
    models_loaded: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GpuMemory:
    """Bytes torch's caching allocator holds on the GPU (its own counters: reading never blocks)."""

    allocated: int
    reserved: int
    max_allocated: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# --- progress, cancellation, the engine -----------------------------------------------------------


@runtime_checkable
class ProgressSink(Protocol):
    """Where an engine reports how far a job is (called between batches, from the engine's threads)."""

    def report(self, phase: str, done: int, total: int) -> None: ...


@runtime_checkable
class CancelToken(Protocol):
    """Asked between batches; once set, the engine stops, removes its partial files and raises
    `errors.Cancelled`. `threading.Event` is one."""

    def is_set(self) -> bool: ...


class NoProgress:
    """A sink that drops every report."""

    def report(self, phase: str, done: int, total: int) -> None:
        pass


class NeverCancelled:
    """A token that is never set."""

    def is_set(self) -> bool:
        return False


class Engine(Protocol):
    """The models on one device and what runs on them, one job at a time.

    Errors are `errors.ServiceError`s (their `code` says what went wrong; the API maps codes to
    HTTP statuses).
    """

    def run(self, task: LipsyncTask, progress: ProgressSink, cancel: CancelToken) -> LipsyncResult:
        """Lip-sync the task's video (or avatar) to its audio and write `request.output_path`."""
        ...

    def prepare(self, task: PrepareTask, progress: ProgressSink, cancel: CancelToken) -> AvatarSummary:
        """Prepare the task's video as an avatar (or find it prepared) and keep it in the cache."""
        ...

    def avatars(self) -> list[AvatarSummary]:
        """The prepared avatars, most recently used first."""
        ...

    def avatar(self, avatar_id: str) -> AvatarSummary | None:
        """One prepared avatar (does not count as a use or a cache hit); None if unknown."""
        ...

    def delete_avatar(self, avatar_id: str) -> bool:
        """Forget the avatar; whether there was one."""
        ...

    def cache_stats(self) -> dict[str, int] | None:
        """The avatar cache's counters (hits, misses, ...); None without a cache."""
        ...

    def health(self) -> EngineHealth: ...

    def device_ok(self) -> bool:
        """A tiny op on the device, waited for. May block if the GPU hangs: call it with a timeout."""
        ...

    def gpu_memory(self) -> GpuMemory | None:
        """None on the CPU. Never blocks."""
        ...
