"""From a request body (JSON or multipart form) to a checked `LipsyncRequest`.

Requests are checked before they are queued, so a typo or a file beyond the limits fails in
milliseconds: paths against the roots (`api/paths.py`), then both media probed and held to `limits.*`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import pydantic
from fastapi import Request

from musetalk_service.api.errors import BadUpload, LimitExceeded, describe_validation_errors
from musetalk_service.api.paths import PathPolicy
from musetalk_service.api.remote_media import UrlTask, media_urls, placeholder
from musetalk_service.api.schemas import AvatarBody, LipsyncBody
from musetalk_service.api.service import Service
from musetalk_service.api.uploads import ReceivedForm
from musetalk_service.contract import is_avatar_id
from musetalk_service.errors import AvatarNotFound, BadAudio, InvalidOption
from musetalk_service.media.adjustments import output_warnings, source_frames_at
from musetalk_service.media.probe import VideoInfo, probe_audio, probe_video
from musetalk_service.media.rates import SPEECH_SAMPLE_RATE, frame_count, output_rate
from musetalk_service.contract import AvatarSummary, LipsyncRequest, LipsyncTask
from musetalk_service.settings import LimitSettings, Settings

MAX_JSON_BYTES = 64 * 1024
MIN_SIDE = 32
"""Smallest frame side worth trying: a face in fewer pixels is not one the models can use."""
_URL_FIELDS = ("video_url", "audio_url", "output_url", "callback_url")
_STRING_FIELDS = {"video_path", "audio_path", "output_path", "avatar_id", "parsing_mode", *_URL_FIELDS}
_NOT_OPTIONS = {"video_path", "audio_path", "output_path", "avatar_id", *_URL_FIELDS}
_PREP_FIELDS = ("face_box", "fps", "bbox_shift", "extra_margin", "parsing_mode", "left_cheek_width", "right_cheek_width", "mask_every")


# --- bodies -------------------------------------------------------------------------------------------


async def json_body(http: Request, model: type[pydantic.BaseModel]) -> Any:
    """The JSON body validated as `model`; over `MAX_JSON_BYTES` it is 413 (`body_too_large`)."""
    length = http.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_JSON_BYTES:
        raise BadUpload(f"the JSON body is larger than {MAX_JSON_BYTES} bytes", code="body_too_large", status=413)
    raw = bytearray()
    async for chunk in http.stream():
        raw.extend(chunk)
        if len(raw) > MAX_JSON_BYTES:
            raise BadUpload(f"the JSON body is larger than {MAX_JSON_BYTES} bytes", code="body_too_large", status=413)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidOption(f"the body is not valid JSON: {e}", code="invalid_request") from None
    except RecursionError:
        raise InvalidOption("the body: JSON nested too deeply", code="invalid_request") from None
    if not isinstance(data, dict):
        raise InvalidOption(
            "the body must be a JSON object (Content-Type: application/json), or multipart/form-data with files",
            code="invalid_request",
        )
    return _validate(model, data)


def _validate(model: type[pydantic.BaseModel], data: dict) -> Any:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise InvalidOption(describe_validation_errors(e.errors())) from None


def body_from_form(
    form: ReceivedForm, model: type[pydantic.BaseModel], file_paths: dict[str, str]
) -> tuple[Any, frozenset[str]]:
    """The body from form fields (JSON values parsed; `options` = all of them as one JSON object)
    plus the uploaded files as their path fields; and which path fields are uploads."""
    data: dict[str, Any] = {}
    if "options" in form.fields:
        try:
            options = json.loads(form.fields["options"])
        except ValueError as e:
            raise InvalidOption(f"options: not valid JSON: {e}") from None
        except RecursionError:
            raise InvalidOption("options: JSON nested too deeply", code="invalid_request") from None
        if not isinstance(options, dict):
            raise InvalidOption("options: must be a JSON object")
        data.update(options)
    for name, value in form.fields.items():
        if name == "options":
            continue
        if name in _STRING_FIELDS:
            data[name] = value
            continue
        try:
            data[name] = json.loads(value)
        except ValueError:
            data[name] = value
        except RecursionError:
            raise InvalidOption(f"{name}: JSON nested too deeply", code="invalid_request") from None
    uploaded = set()
    for part, path_field in file_paths.items():
        if part in form.files:
            if data.get(path_field) is not None:
                raise InvalidOption(f"{path_field}: give a path or upload file {part!r}, not both")
            data[path_field] = str(form.files[part])
            uploaded.add(path_field)
    return _validate(model, data), frozenset(uploaded)


# --- checked requests ---------------------------------------------------------------------------------


class CheckedLipsync(NamedTuple):
    task: LipsyncTask | UrlTask
    frames: int
    """The output's frame count (`check_limits`); 0 while a medium is a URL not fetched yet."""


def checked_request(service: Service, body: LipsyncBody, uploaded: frozenset[str]) -> CheckedLipsync:
    """A lip-sync body as a task whose paths, avatar and media limits are checked (blocking: probes).

    With URL fields it is a `UrlTask`: the URLs are checked now, the media they name when the job
    has fetched them (api/remote_media.py)."""
    urls = media_urls(body, service.settings.urls)
    for name in ("video", "audio"):
        if getattr(body, f"{name}_url") is not None and getattr(body, f"{name}_path") is not None:
            raise InvalidOption(f"{name}_url: give {name}_path (or upload {name}) or {name}_url, not both")
    if body.audio_path is None and body.audio_url is None:
        raise InvalidOption("give audio_path (or upload audio) or audio_url")
    fetched = {f"{name}_path": placeholder(url, name) for name, url in (("video", urls.video_url), ("audio", urls.audio_url)) if url}
    body = body.model_copy(update=fetched)
    request = prepare_request(body, service.settings, service.paths, uploaded=uploaded | fetched.keys())
    avatar = find_avatar(service.pipeline, body.avatar_id) if body.avatar_id is not None else None
    if not urls:
        task = check_limits(request, service.settings, avatar)
        return CheckedLipsync(task, task.frames)
    frames = 0 if fetched else check_limits(request, service.settings, avatar).frames
    return CheckedLipsync(UrlTask(request, urls, avatar=avatar, auto_output=body.output_path is None), frames)


def checked_avatar_request(service: Service, body: AvatarBody, uploaded: frozenset[str]) -> LipsyncRequest:
    """An avatar body as a request (video and preparation options only), its video checked (blocking: probes)."""
    video = _input_path(service.paths, body.video_path, "video_path", trusted="video_path" in uploaded)
    request = _request(service.settings, video=video, audio=Path(), output=Path(), options=_options(body, _PREP_FIELDS))
    info = probe_video(video)
    _check_video(info, service.settings.limits, None if request.face_box else service.settings.face.detect_max_side)
    check_face_box(request, info)
    _frames_at(info, output_rate(request.fps, info.fps))
    return request


def find_avatar(pipeline: Any, avatar_id: str) -> dict:
    """The prepared avatar's summary row; `AvatarNotFound` (404) if there is none of that id."""
    if is_avatar_id(avatar_id):
        for row in pipeline.list_avatars():
            if row.get("key") == avatar_id:
                return row
    shown = avatar_id if len(avatar_id) <= 64 else avatar_id[:64] + "..."
    raise AvatarNotFound(f"avatar_id: no prepared avatar {shown!r} (POST /avatars prepares one; GET /avatars lists them)")


# --- requests -----------------------------------------------------------------------------------------


def prepare_request(
    body: LipsyncBody,
    settings: Settings,
    paths: PathPolicy | None = None,
    *,
    uploaded: frozenset[str] = frozenset(),
) -> LipsyncRequest:
    """The request with the configured defaults filled in, once its paths are known to be usable.

    Paths are checked here, before the request waits for the models, so a typo fails in
    milliseconds; `paths` (default: no roots) says where inputs may be read and outputs written.
    Fields in `uploaded` name files the service itself saved; they skip the root check.
    """
    paths = paths or PathPolicy()
    if (body.video_path is None) == (body.avatar_id is None):
        raise InvalidOption("give video_path (or upload video) or avatar_id, one of them")
    if body.avatar_id is not None:
        given = sorted(name for name in _PREP_FIELDS if getattr(body, name) is not None)
        if given:
            raise InvalidOption(
                f"{', '.join(given)}: an avatar keeps the options it was prepared with; leave these out with avatar_id"
            )
    video = None
    if body.video_path is not None:
        video = _input_path(paths, body.video_path, "video_path", trusted="video_path" in uploaded)
    audio = _input_path(paths, body.audio_path, "audio_path", trusted="audio_path" in uploaded)
    if body.output_path is not None:
        output = paths.check_output(body.output_path, "output_path")
    else:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        stem = _safe_stem(Path(body.video_path).stem if body.video_path else f"avatar-{body.avatar_id[:8]}")
        name = f"{stem}_{_safe_stem(audio.stem)}_{uuid.uuid4().hex[:8]}.mp4"
        output = paths.check_output(settings.output_dir / name, "output_path")
    option_fields = [name for name in LipsyncBody.model_fields if name not in _NOT_OPTIONS]
    return _request(settings, video=video, audio=audio, output=output, options=_options(body, option_fields), avatar_id=body.avatar_id)


def _options(body: LipsyncBody | AvatarBody, names: Iterable[str]) -> dict[str, Any]:
    """The body's option values as validated (`face_box` a tuple, `fps` a Fraction), not as
    `model_dump` serializes them (a Fraction as the string "3/2"). An fps sent as a number with a
    fraction stays that float: the engine snaps it by the same rule (`media.rates.exact_rate`), and
    the check can warn when the snap changed it."""
    options = {name: getattr(body, name) for name in names}
    if "fps" in options and body.fps_number is not None:
        options["fps"] = body.fps_number
    return options


def _request(settings: Settings, *, video, audio, output, options: dict, avatar_id: str | None = None) -> LipsyncRequest:
    merged = settings.lipsync.model_dump()
    merged.update({k: v for k, v in options.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(LipsyncRequest)}
    extra = {"avatar_id": avatar_id} if "avatar_id" in fields else {}
    return LipsyncRequest(video_path=video, audio_path=audio, output_path=output, **extra, **merged)


def _input_path(paths: PathPolicy, given: str, field: str, *, trusted: bool) -> Path:
    if trusted:
        return Path(given)
    return paths.check_input(given, field)


def _safe_stem(stem: str) -> str:
    """A file-name part of ASCII letters, digits, `-`, `_` and `.` (client names may hold anything)."""
    cleaned = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in stem)[:40].lstrip(".")
    return cleaned or "media"


# --- limits --------------------------------------------------------------------------------------------


def check_limits(request: LipsyncRequest, settings: Settings, avatar: dict | None = None) -> LipsyncTask:
    """Probe both media and hold them to `settings.limits` (422 with a code naming the limit): the
    checked task: the output's frame count, as the pipeline will count it from the decoded speech
    track, and its `warnings` saying what the lip-sync will change unasked (media/adjustments.py).

    The probe also fails a file that is not usable media, before it waits in the queue.
    """
    limits = settings.limits
    summary = avatar_record(avatar) if avatar is not None else None
    if summary is not None:
        if not summary.video.is_file():
            raise AvatarNotFound(f"avatar_id: the video of avatar {summary.avatar_id} is gone; prepare it again")
        video = probe_video(summary.video)
        _check_size(summary.width, summary.height, limits)
        fps, source_frames = summary.fps, summary.frame_count
    else:
        video = probe_video(request.video_path)
        _check_video(video, limits, None if request.face_box else settings.face.detect_max_side)
        check_face_box(request, video)
        fps = output_rate(request.fps, video.fps)
        source_frames = _frames_at(video, fps)
    audio = probe_audio(request.audio_path)
    if audio.duration_s > limits.max_audio_seconds:
        raise LimitExceeded(
            f"audio_path: the audio lasts {audio.duration_s:.1f} s, over the limit of {limits.max_audio_seconds:g} s "
            "(limits.max_audio_seconds)",
            code="audio_too_long",
        )
    frames = frame_count(round(audio.duration_s * SPEECH_SAMPLE_RATE), fps)
    if frames < 1:
        raise BadAudio(
            f"audio_path: the audio lasts {audio.duration_s:.3f} s, shorter than one video frame at {float(fps):g} fps"
        )
    if frames > limits.max_frames:
        raise LimitExceeded(
            f"the output would have {frames} frames ({audio.duration_s:.1f} s at {float(fps):g} fps), over the "
            f"limit of {limits.max_frames} (limits.max_frames); send shorter audio or a lower fps",
            code="too_many_frames",
        )
    warnings = output_warnings(
        width=video.width, height=video.height, source_fps=video.fps, source_frames=source_frames, fps=fps, audio=audio,
        fps_given=request.fps if isinstance(request.fps, float) else None, still=video.is_image,
    )  # fmt: skip
    return LipsyncTask(request, video, audio, avatar=summary, warnings=tuple(warnings), frames=frames)


def _frames_at(video: VideoInfo, fps: Fraction) -> int:
    """The video's frames at `fps`; 400 when that gives none (too low an fps for so short a video)."""
    frames = source_frames_at(video.duration_s, video.frame_count, video.fps, fps)
    if frames < 1:
        raise InvalidOption(
            f"fps: the {video.duration_s:.3f} s video has no frame at {float(fps):g} fps; "
            f"ask for at least {math.ceil(0.5 / video.duration_s):g} fps"
        )
    return frames


def avatar_record(row: dict[str, Any]) -> AvatarSummary:
    """A prepared avatar's summary row (the cache's listing) as the contract's record."""
    fields = {k: v for k, v in row.items() if k != "key"}
    return AvatarSummary(**{**fields, "avatar_id": row["key"], "video": Path(row["video"]), "fps": Fraction(row["fps"])})


def check_face_box(request: LipsyncRequest, video: Any) -> None:
    """The request's face box (if any) lies inside the probed video's frame (400 `invalid_option`)."""
    box = request.face_box
    if box is not None and (box[2] > video.width or box[3] > video.height):
        raise InvalidOption(
            f"face_box: {list(box)} reaches outside the {video.width}x{video.height} frame "
            "(x2 <= width, y2 <= height, in displayed pixels)"
        )


def _check_video(video, limits: LimitSettings, detect_max_side: int | None = None) -> None:
    """Size and duration limits; `detect_max_side`: frames are shrunk to it for face detection."""
    _check_size(video.width, video.height, limits, detect_max_side)
    if video.duration_s > limits.max_video_seconds:
        raise LimitExceeded(
            f"video_path: the video lasts {video.duration_s:.1f} s, over the limit of {limits.max_video_seconds:g} s "
            "(limits.max_video_seconds)",
            code="video_too_long",
        )


def _check_size(width: int, height: int, limits: LimitSettings, detect_max_side: int | None = None) -> None:
    scale = min(1.0, detect_max_side / max(width, height)) if detect_max_side else 1.0
    if min(width, height) * scale < MIN_SIDE:
        shown = f"{width}x{height}" + (f" ({round(width * scale)}x{round(height * scale)} for face detection)" if scale < 1 else "")
        raise LimitExceeded(
            f"video_path: {shown} is too small: frames need at least {MIN_SIDE} pixels on each side to find a face",
            code="resolution_too_small",
        )
    if width * height > limits.max_pixels:
        raise LimitExceeded(
            f"video_path: {width}x{height} is {width * height} pixels a frame, over the limit of {limits.max_pixels} "
            "(limits.max_pixels); scale the video down",
            code="resolution_too_large",
        )
