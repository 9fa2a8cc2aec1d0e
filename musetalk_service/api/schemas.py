"""The HTTP contract: request and response bodies. Field descriptions become the OpenAPI docs."""

# No `from __future__ import annotations`: the option fields' annotations are built by `_option()`
# calls, evaluated here rather than by pydantic from strings.
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    NonNegativeInt,
    PrivateAttr,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from musetalk_service.media.rates import MAX_FPS, MIN_FPS, parse_fps
from musetalk_service.settings import LipsyncDefaults


MIN_BOX_SIDE = 2
"""The smallest longer side a `face_box` may have (the blend square around it needs a half-side of 1 px)."""


def _not_a_bool(value: object) -> object:
    """JSON `true`/`false` are not numbers (pydantic's lax int would take them as 1 and 0)."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "must be a number, not true or false")
    return value


_Count = Annotated[NonNegativeInt, BeforeValidator(_not_a_bool)]


def _option(name: str, description: str | None = None) -> Any:
    """An optional per-request option with the type and range of `LipsyncDefaults.<name>`.

    The ranges live once, in settings: a request may not set what the config file may not.
    """
    field = LipsyncDefaults.model_fields[name]
    checks = (*field.metadata, BeforeValidator(_not_a_bool)) if field.annotation is int else field.metadata
    ranged = Annotated[(field.annotation, *checks)] if checks else field.annotation
    text = description or field.description
    return Annotated[ranged | None, Field(description=f"{text} Unset: the configured default (`lipsync.{name}`).")]


_CHEEK = (
    "`jaw` mode: columns {side} of the centre of the 512-px parsing map that use the dilated mask; "
    "outside them the mask is eroded."
)


class _PrepOptions(BaseModel):
    """The options that shape how a video is prepared (face boxes, latents, blend masks)."""

    model_config = ConfigDict(extra="forbid")

    face_box: tuple[_Count, _Count, _Count, _Count] | None = Field(
        None,
        description="`[x1, y1, x2, y2]` in source-frame pixels (x2, y2 exclusive): use this face box "
        "on every frame and skip face detection.",
    )
    fps: Annotated[
        Fraction,
        BeforeValidator(parse_fps),
        WithJsonSchema({"anyOf": [
            {"type": "number", "minimum": MIN_FPS, "maximum": MAX_FPS},
            {"type": "string", "pattern": r"^[0-9]+(/[0-9]+)?$", "examples": ["30000/1001", "25"]},
        ]}),
    ] | None = Field(
        None,
        description=f"Output frame rate, {MIN_FPS} to {MAX_FPS}: a number (snapped to the nearest fraction of denominator <= 1001) or an exact "
        "rate string such as `\"30000/1001\"`, kept exactly; unset keeps the video's own rate.",
    )
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

    _fps_number: float | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_fps_number(cls, data: Any, handler: ModelWrapValidatorHandler["_PrepOptions"]) -> "_PrepOptions":
        body = handler(data)
        given = data.get("fps") if isinstance(data, dict) else None
        if isinstance(given, float):
            body._fps_number = given
        return body

    @property
    def fps_number(self) -> float | None:
        """`fps` as sent when it was a number with a fraction: `fps` is its snap (a result warning says so if they differ)."""
        return self._fps_number

    @field_validator("face_box")
    @classmethod
    def _box_has_area(cls, box: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if box is not None and (box[2] <= box[0] or box[3] <= box[1]):
            raise PydanticCustomError("empty_box", "needs x2 > x1 and y2 > y1, got {box}", {"box": list(box)})
        if box is not None and max(box[2] - box[0], box[3] - box[1]) < MIN_BOX_SIDE:
            # The blend square's half-side is max(w, h) // 2: a 1-px box gives 0 and fails only after the models ran.
            raise PydanticCustomError(
                "box_too_small", "is {box}: its longer side must be at least {side} px, e.g. [x1, y1, x1 + 2, y1 + 2]",
                {"box": list(box), "side": MIN_BOX_SIDE},
            )
        return box


class LipsyncBody(_PrepOptions):
    """One lip-sync: a talking-head video (or a prepared avatar), a speech track, and optional options.

    As JSON, the media are paths the server can read. As `multipart/form-data`, files `video` and
    `audio` may be uploaded instead (the other fields as form fields of the same names).
    """

    video_path: str | None = Field(
        None, description="Path of the talking-head video, as the server sees it. Give this or `avatar_id`."
    )
    avatar_id: str | None = Field(
        None,
        description="A prepared avatar (`POST /avatars`) instead of `video_path`: its video and "
        "preparation options are used, and preparation is skipped.",
    )
    audio_path: str | None = Field(
        None, description="Path of the speech track (wav, mp3, m4a, ogg...); the output lasts as long as it. "
        "Give this or `audio_url`."
    )
    video_url: str | None = Field(
        None,
        description="http(s) URL of the video instead of `video_path` (e.g. a presigned GET); its host must be in "
        "`urls.allowed_hosts`. The job fetches it (same limits as uploads) before it runs.",
    )
    audio_url: str | None = Field(None, description="http(s) URL of the speech track instead of `audio_path`.")
    output_url: str | None = Field(
        None,
        description="http(s) URL the MP4 is PUT to (e.g. a presigned PUT), retried on 5xx and connection errors; "
        "the result's `output_uploaded_to` says where it went. Without `output_path` the server keeps no copy.",
    )
    callback_url: str | None = Field(
        None,
        description="http(s) URL that receives the job's final status once (POST, the `GET /jobs/{job_id}` body), "
        "signed with `X-MuseTalk-Signature: sha256=<HMAC>` when `urls.callback_secret` is set.",
    )
    output_path: str | None = Field(
        None,
        description="Where to write the MP4; its directory must exist and be writable (and lie under "
        "`output_roots` when set). Unset: `<output_dir>/<video>_<audio>_<id>.mp4` on the server, "
        "removed when the job is forgotten (`jobs.keep_finished_s`).",
    )
    batch_size: _option("batch_size") = None
    silence: _option(
        "silence",
        "Frames whose audio is silent: `generate` a mouth as for speech, or show the `source` video's frame as it "
        "is (its resting mouth, no GPU work for it), cross-faded over a few frames at each boundary.",
    ) = None


class AvatarBody(_PrepOptions):
    """A video to prepare ahead of time. As `multipart/form-data`, upload file `video` instead."""

    video_path: str = Field(description="Path of the talking-head video, as the server sees it.")


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
    frames_generated: int = Field(0, description="Frames whose mouth was generated (UNet + VAE decode + blend).")
    frames_silent: int = Field(
        0, description="Frames passed through as silent (`silence: source`): the source frame as it is, nothing generated."
    )
    avatar_id: str | None = Field(
        None, description="The prepared video this was made from: name it in later requests to skip preparation."
    )
    warnings: list[str] = Field(default_factory=list, description="Things worth knowing about this output.")
    job_id: str | None = Field(
        None, description="The job that made it: `GET /jobs/{job_id}/output` downloads the MP4 while the job is kept."
    )
    output_uploaded_to: str | None = Field(
        None, description="With `output_url`: where the MP4 was uploaded (the URL without its query string)."
    )
    engine_replica: str | None = Field(None, description="Ray Serve only: the engine replica that made it.")


class JobAccepted(BaseModel):
    """A queued job (202): poll `status_url`."""

    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="Usually `queued`; a job may have started (or even finished) by the time this is sent."
    )
    status_url: str = Field(description="`/jobs/{job_id}`: poll it for status, progress and the result.")
    queue_position: int | None = Field(None, description="1-based place in the queue when accepted.")


class JobResponse(BaseModel):
    """A job's state: `GET /jobs/{job_id}`."""

    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    phase: str = Field(
        description="What it is doing: `queued` (waiting for the GPU), `starting` (probing the media, the speech "
        "features), `prepare` (an avatar's face boxes, latents, masks), `frames` (lip-sync), `done`."
    )
    frames_done: int = Field(description="Frames done in the current phase.")
    frames_total: int = Field(
        description="Frames the current phase will do. A lip-sync's output frames from its submission, as counted from "
        "its probed speech track (the pipeline's own count once it has decoded it); 0 until known (media by URL, "
        "an avatar's preparation)."
    )
    cancel_requested: bool = Field(description="A cancel (client, time limit or shutdown) is on its way.")
    queue_position: int | None = Field(description="1-based place in the queue while queued.")
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    queue_wait_s: float = Field(description="Seconds waited for the GPU.")
    run_s: float | None = Field(description="Seconds running so far (or in all, once finished).")
    timings: dict[str, float] = Field(description="Seconds per phase so far; the pipeline's own once succeeded.")
    result: dict[str, Any] | None = Field(
        description="Once succeeded: the lip-sync's facts (as `POST /lipsync` returns them), or the avatar's."
    )
    error: "ErrorDetail | None" = Field(description="Once failed or cancelled: why.")
    status_url: str
    output_url: str | None = Field(description="Once a lip-sync succeeded: where to download the MP4.")


class JobList(BaseModel):
    """`GET /jobs`."""

    jobs: list[JobResponse] = Field(description="Newest first.")


class HealthResponse(BaseModel):
    """Liveness: the process answers. Cheap; never waits for the GPU."""

    status: Literal["ok"] = Field(description="`ok`: the process is alive and its event loop answers.")
    models_loaded: bool = Field(description="Every network is resident on the device (false while loading).")
    device: str | None = Field(description="The torch device the models run on, e.g. `cuda:0` or `cpu`.")
    weights: Literal["random", "official", "custom"] | None = Field(description="Which weights are loaded.")
    encoder: str | None = Field(description="The H.264 encoder chosen at start by probing ffmpeg.")


class ReplicaCounts(BaseModel):
    """Engine replicas of a Ray Serve deployment."""

    ready: int = Field(description="Replicas passing Ray's health check (their device answers).")
    total: int = Field(description="Replicas configured (`ray.engine_replicas`).")


class ReadyResponse(BaseModel):
    """Readiness: the service takes jobs now (200); otherwise 503 with the reason."""

    status: Literal["ready"] = "ready"
    queue_depth: int = Field(description="Jobs waiting for the GPU.")
    max_queue: int = Field(description="Beyond this many waiting jobs, submissions get 429.")
    jobs_running: int = Field(description="Jobs running now: 0 or 1 in one process; up to one per engine replica on Ray Serve.")
    replicas: ReplicaCounts | None = Field(None, description="Ray Serve only: engine replicas ready and in total.")


class AvatarResponse(BaseModel):
    """A prepared avatar."""

    model_config = ConfigDict(extra="allow")

    avatar_id: str = Field(description="Name it as `avatar_id` in `POST /lipsync` or `POST /jobs`.")
    frame_count: int = Field(description="Source frames prepared.")
    fps: str = Field(description="The rate the video was prepared at, as a fraction, e.g. `25/1`.")
    width: int
    height: int
    faces: int = Field(description="Frames with a face.")


class AvatarList(BaseModel):
    avatars: list[AvatarResponse] = Field(description="Most recently used first.")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `file_not_found`, `invalid_option`.")
    message: str = Field(description="What is wrong and what to change.")


class ErrorResponse(BaseModel):
    """Every error, 4xx and 5xx alike."""

    error: ErrorDetail


JobResponse.model_rebuild()
JobList.model_rebuild()
