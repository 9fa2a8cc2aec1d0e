"""The HTTP contract: request and response bodies. Field descriptions become the OpenAPI docs."""

# No `from __future__ import annotations`: the option fields' annotations are built by `_option()`
# calls, evaluated here rather than by pydantic from strings.
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator
from pydantic_core import PydanticCustomError

from musetalk_service.settings import LipsyncDefaults


def _option(name: str, description: str | None = None) -> Any:
    """An optional per-request option with the type and range of `LipsyncDefaults.<name>`.

    The ranges live once, in settings: a request may not set what the config file may not.
    """
    field = LipsyncDefaults.model_fields[name]
    ranged = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    text = description or field.description
    return Annotated[ranged | None, Field(description=f"{text} Unset: the configured default (`lipsync.{name}`).")]


_CHEEK = (
    "`jaw` mode: columns {side} of the centre of the 512-px parsing map that use the dilated mask; "
    "outside them the mask is eroded."
)


class LipsyncBody(BaseModel):
    """One lip-sync: a talking-head video, a speech track, and optional crop/blend options."""

    model_config = ConfigDict(extra="forbid")

    video_path: str = Field(description="Path of the talking-head video, as the server sees it.")
    audio_path: str = Field(
        description="Path of the speech track (wav, mp3, m4a, ogg...); the output lasts as long as it."
    )
    output_path: str | None = Field(
        None,
        description="Where to write the MP4; its directory must exist and be writable. "
        "Unset: `<output_dir>/<video>_<audio>_<id>.mp4` on the server.",
    )
    face_box: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt, NonNegativeInt] | None = Field(
        None,
        description="`[x1, y1, x2, y2]` in source-frame pixels (x2, y2 exclusive): use this face box "
        "on every frame and skip face detection.",
    )
    fps: float | None = Field(
        None, gt=0, le=120, description="Output frame rate; unset keeps the video's own rate."
    )
    batch_size: _option("batch_size") = None
    bbox_shift: _option("bbox_shift") = None
    extra_margin: _option("extra_margin") = None
    parsing_mode: _option(
        "parsing_mode",
        "Which face-parsing regions take the generated face: `raw` (skin, mouth, lips), `neck` (raw plus "
        "the neck), `jaw` (the v1.5 rule: skin dilated around the jaw, plus mouth and lips).",
    ) = None
    left_cheek_width: _option("left_cheek_width", _CHEEK.format(side="left")) = None
    right_cheek_width: _option("right_cheek_width", _CHEEK.format(side="right")) = None
    mask_every: _option("mask_every") = None

    @field_validator("face_box")
    @classmethod
    def _box_has_area(cls, box: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if box is not None and (box[2] <= box[0] or box[3] <= box[1]):
            raise PydanticCustomError("empty_box", "needs x2 > x1 and y2 > y1, got {box}", {"box": list(box)})
        return box


class LipsyncResponse(BaseModel):
    """A finished lip-sync."""

    output_path: str = Field(description="Where the MP4 (H.264 + the request's audio) was written.")
    frames: int = Field(description="Output frames: floor(audio seconds x fps).")
    fps: float = Field(description="Output frame rate.")
    duration_s: float = Field(description="Audio duration in seconds; the video matches it within one frame.")
    encoder: str = Field(description="The H.264 encoder used (`h264_nvenc` or `libx264`).")
    weights: Literal["random", "official", "custom"] = Field(
        description="Which weights made this: `random` output is not a lip-sync."
    )
    timings: dict[str, float] = Field(
        description="Seconds per phase (read, face_detect, vae_encode, audio, unet, blend, encode, mux) "
        "plus `total`, the request's wall time inside the pipeline."
    )
    fallbacks: int = Field(description="Frames whose fast blend failed and were recomputed the slow way.")
    frames_without_face: int = Field(description="Frames passed through unchanged: no face in their source frame.")
    warnings: list[str] = Field(default_factory=list, description="Things worth knowing about this output.")


class HealthResponse(BaseModel):
    """The loaded service."""

    status: Literal["ok"] = Field(description="`ok`: the models are loaded and warmed up.")
    device: str = Field(description="The torch device the models run on, e.g. `cuda:0` or `cpu`.")
    weights: Literal["random", "official", "custom"] = Field(description="Which weights are loaded.")
    encoder: str = Field(description="The H.264 encoder chosen at start by probing ffmpeg.")
    models_loaded: bool = Field(description="Every network is resident on the device.")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `file_not_found`, `invalid_option`.")
    message: str = Field(description="What is wrong and what to change.")


class ErrorResponse(BaseModel):
    """Every error, 4xx and 5xx alike."""

    error: ErrorDetail
