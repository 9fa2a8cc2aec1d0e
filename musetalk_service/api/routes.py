"""HTTP routes: jobs, the synchronous lip-sync, avatars, probes and metrics.

Every lip-sync or avatar preparation is a job on the one GPU queue (`api/jobs.py`). Requests are
checked before they are queued, so a typo or a file beyond the limits fails in milliseconds:
paths against the roots (`api/paths.py`), then both media probed and held to `limits.*`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pydantic
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from musetalk_service.api.errors import BadUpload, LimitExceeded, describe_validation_errors, error_response
from musetalk_service.api.jobs import Job, JobNotFound, JobStatus, ShuttingDown
from musetalk_service.api.paths import PathPolicy
from musetalk_service.api.schemas import (
    AvatarBody,
    AvatarList,
    AvatarResponse,
    ErrorResponse,
    HealthResponse,
    JobAccepted,
    JobResponse,
    LipsyncBody,
    LipsyncResponse,
    ReadyResponse,
)
from musetalk_service.api.service import AvatarTask, JobFiles, Service, avatar_summary
from musetalk_service.api.uploads import ReceivedForm, is_multipart, receive_form
from musetalk_service.errors import AvatarNotFound, InvalidOption
from musetalk_service.media.probe import probe_audio, probe_video
from musetalk_service.pipeline.avatar_cache import is_avatar_key
from musetalk_service.pipeline.request import LipsyncRequest
from musetalk_service.settings import LimitSettings, Settings

router = APIRouter()

MAX_JSON_BYTES = 64 * 1024
MIN_SIDE = 32
"""Smallest frame side worth trying: a face in fewer pixels is not one the models can use."""
_STRING_FIELDS = {"video_path", "audio_path", "output_path", "avatar_id", "parsing_mode"}
_PREP_FIELDS = ("face_box", "fps", "bbox_shift", "extra_margin", "parsing_mode", "left_cheek_width", "right_cheek_width", "mask_every")


def _errors(*statuses: int) -> dict:
    described = {
        400: "A missing input file, an unusable output path, a bad option value or a malformed body.",
        401: "A missing or wrong X-API-Key header (when `api_key` is set).",
        403: "A path outside the configured input or output roots.",
        404: "No such job or avatar (or it was forgotten).",
        409: "The job has no output (yet).",
        413: "An upload over `limits.max_upload_bytes`.",
        422: "Media the pipeline can't use, or beyond a limit: not a video, no video stream, bad audio, no face, "
        "too long, too large, too many frames.",
        429: "The queue is full; the Retry-After header says when to try again.",
        499: "The job was cancelled (`DELETE /jobs/{job_id}`).",
        503: "Not ready: the models are loading or failed to load, or shutting down (a waited-for job stopped "
        "by shutdown too): retry on another instance.",
        504: "The job ran past `jobs.time_limit_s`.",
        507: "No space left on the output or work disk.",
        500: "A fault of the service itself.",
    }
    return {s: {"model": ErrorResponse, "description": described[s]} for s in statuses}


def _body_doc(model: type[pydantic.BaseModel], files: str) -> dict:
    """OpenAPI: the body is JSON, or multipart with files (the routes read it themselves)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "description": f"Upload {files} as file parts; any other field of {model.__name__} "
                        "as a form field of the same name (JSON values such as `face_box=[1,2,3,4]` are parsed), "
                        "or all of them at once as JSON in field `options`.",
                    }
                },
            },
        }
    }


_SUBMIT_ERRORS = _errors(400, 401, 403, 404, 413, 422, 429, 503, 500)


def _service(http: Request) -> Service:
    return http.app.state.service


# --- probes and metrics -------------------------------------------------------------------------


@router.get("/health", response_model=HealthResponse)
async def health(http: Request) -> dict:
    """Liveness: 200 while the process answers, loading or not. Cheap: never touches the GPU or
    waits for a job. A watchdog restarts the service when this fails (no API key needed)."""
    pipeline = _service(http).pipeline
    facts = pipeline.health() if pipeline is not None else {}
    return {
        "status": "ok",
        "models_loaded": pipeline is not None,
        "device": facts.get("device"),
        "weights": facts.get("weights"),
        "encoder": facts.get("encoder"),
    }


@router.get("/ready", response_model=ReadyResponse, responses=_errors(401, 503))
async def ready(http: Request) -> Any:
    """Readiness: 200 once the models are loaded and warmed and the GPU answers a tiny op; 503
    (with the reason) while loading, if the GPU stops answering, or once shutting down. Load
    balancers route by it; a watchdog should not restart on it (a busy GPU is still alive)."""
    service = _service(http)
    reason = await service.not_ready_reason()
    if reason is not None:
        return error_response(503, "not_ready", reason)
    jobs = service.jobs
    return {"status": "ready", "queue_depth": jobs.queue_depth, "max_queue": jobs.max_queue, "jobs_running": jobs.running_count}


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
async def metrics(http: Request) -> Response:
    """Prometheus metrics (`musetalk_*`): requests by route and outcome, queue depth, job durations,
    per-phase seconds, frames, output fps, avatar cache hits and misses, GPU memory."""
    service = _service(http)
    service.sync_cache_metrics()
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)


# --- jobs -------------------------------------------------------------------------------------------


@router.post(
    "/jobs", status_code=202, response_model=JobAccepted, responses=_SUBMIT_ERRORS,
    openapi_extra=_body_doc(LipsyncBody, "`video` and/or `audio`"),
)
async def submit_job(http: Request) -> Response:
    """Queue a lip-sync (same body as `POST /lipsync`); 202 at once with the job's `status_url`."""
    service = _service(http)
    job = await _submit_lipsync(service, http)
    view = job.to_dict()
    url = f"/jobs/{job.id}"
    try:
        position = service.jobs.snapshot(job.id)["queue_position"]
    except JobNotFound:  # finished and forgotten already (keep_finished_s: 0)
        position = None
    return JSONResponse(
        {"job_id": job.id, "status": view["status"], "status_url": url, "queue_position": position},
        status_code=202,
        headers={"Location": url},
    )


@router.get("/jobs/{job_id}", response_model=JobResponse, responses=_errors(401, 404))
async def get_job(job_id: str, http: Request) -> dict:
    """Status (queued, running, succeeded, failed, cancelled), phase, frames done of total,
    timings so far, and the result or the error."""
    return _job_view(_service(http).jobs.snapshot(job_id))


@router.delete("/jobs/{job_id}", response_model=JobResponse, responses={202: {"model": JobResponse}, **_errors(401, 404)})
async def cancel_job(job_id: str, http: Request) -> JSONResponse:
    """Cancel: a queued job ends at once (200); a running one stops at its next batch, its ffmpeg
    ended and partial files removed (202 with `cancel_requested`). A finished job is left as it is."""
    jobs = _service(http).jobs
    jobs.cancel(job_id)
    view = _job_view(jobs.snapshot(job_id))
    return JSONResponse(view, status_code=202 if view["status"] == "running" else 200)


@router.get(
    "/jobs/{job_id}/output",
    responses={200: {"content": {"video/mp4": {}}, "description": "The MP4."}, **_errors(401, 404, 409)},
)
async def job_output(job_id: str, http: Request) -> Response:
    """Download a succeeded lip-sync's MP4 (while the job is kept: `jobs.keep_finished_s`)."""
    job = _service(http).jobs.get(job_id)
    if not job.done.is_set() or job.status is not JobStatus.SUCCEEDED or not hasattr(job.result, "output_path"):
        return error_response(409, "no_output", f"job {job_id} has no output: it is {job.status.value}")
    path = Path(job.result.output_path)
    if not path.is_file():
        return error_response(404, "output_gone", f"job {job_id}'s output is no longer on the server")
    return FileResponse(path, media_type="video/mp4", filename=path.name)


def _job_view(snapshot: dict) -> dict:
    url = f"/jobs/{snapshot['job_id']}"
    succeeded = snapshot["status"] == "succeeded" and snapshot["result"] and "output_path" in snapshot["result"]
    return {**snapshot, "status_url": url, "output_url": f"{url}/output" if succeeded else None}


@router.post(
    "/lipsync", response_model=LipsyncResponse, responses={**_SUBMIT_ERRORS, **_errors(499, 504, 507)},
    openapi_extra=_body_doc(LipsyncBody, "`video` and/or `audio`"),
)
async def lipsync(http: Request) -> Any:
    """Lip-sync a video (or a prepared avatar) to a speech track and wait for it: a job like
    `POST /jobs`, waited for here. If the client goes away first, the job is cancelled."""
    service = _service(http)
    job = await _submit_lipsync(service, http)
    await wait_for(service, job, http)
    _raise_failure(job)
    return {**job.result.to_dict(), "job_id": job.id}


async def _submit_lipsync(service: Service, http: Request) -> Job:
    service.require_loaded()
    settings = service.settings
    files = JobFiles()
    try:
        if is_multipart(http):
            files.upload_dir = service.upload_folder()
            form = await receive_form(
                http, files.upload_dir, max_bytes=settings.limits.max_upload_bytes, file_fields=("video", "audio")
            )
            body, uploaded = _body_from_form(form, LipsyncBody, {"video": "video_path", "audio": "audio_path"})
        else:
            body, uploaded = await _json_body(http, LipsyncBody), frozenset()
        request = await anyio.to_thread.run_sync(_checked_request, service, body, uploaded)
        if body.output_path is None:
            files.auto_output = request.output_path
    except BaseException:
        if files.upload_dir is not None:
            shutil.rmtree(files.upload_dir, ignore_errors=True)
        raise
    return service.submit(request, files)


def _checked_request(service: Service, body: LipsyncBody, uploaded: frozenset[str]) -> LipsyncRequest:
    request = prepare_request(body, service.settings, service.paths, uploaded=uploaded)
    avatar = _find_avatar(service.pipeline, body.avatar_id) if body.avatar_id is not None else None
    check_limits(request, service.settings, avatar)
    return request


def _raise_failure(job: Job) -> None:
    """A waited-for job's error; one stopped by shutdown is 503 (retry on another instance)."""
    if job.error is None:
        return
    if job.cancel_reason == "shutdown":
        raise ShuttingDown(f"the service shut down before job {job.id} could finish; retry on another instance")
    raise job.error


async def wait_for(service: Service, job: Job, http: Request) -> None:
    """Wait until `job` is done; if the client disconnects first, cancel it.

    Polls the job's event from the event loop rather than blocking a worker thread per waiting
    request: those threads come from anyio's shared pool (40 by default), which uploads, file
    downloads and the probes also use.
    """
    gone = False
    async with anyio.create_task_group() as group:

        async def watch_client() -> None:
            nonlocal gone
            while True:
                message = await http.receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    group.cancel_scope.cancel()
                    return

        group.start_soon(watch_client)
        delay = 0.002
        while not job.done.is_set():
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 0.05)
        group.cancel_scope.cancel()
    if gone and not job.done.is_set():
        service.jobs.cancel(job.id)


# --- avatars ------------------------------------------------------------------------------------------


@router.post(
    "/avatars", status_code=201, response_model=AvatarResponse, responses={**_SUBMIT_ERRORS, **_errors(499, 504, 507)},
    openapi_extra=_body_doc(AvatarBody, "`video`"),
)
async def create_avatar(http: Request) -> JSONResponse:
    """Prepare a video ahead of time (face boxes, latents, blend masks) and keep it in the avatar
    cache; name the returned `avatar_id` in lip-sync requests instead of `video_path`. Runs as a job
    on the GPU queue, waited for here (cancelled if the client goes away)."""
    service = _service(http)
    service.require_loaded()
    settings = service.settings
    files = JobFiles()
    try:
        if is_multipart(http):
            files.upload_dir = service.upload_folder()
            form = await receive_form(http, files.upload_dir, max_bytes=settings.limits.max_upload_bytes, file_fields=("video",))
            body, uploaded = _body_from_form(form, AvatarBody, {"video": "video_path"})
            if uploaded:
                # The avatar refers to its video for every later request: keep it outside the upload folder.
                staged = form.files["video"]
                files.avatar_video = service.avatar_video_path(staged.suffix)
                shutil.move(staged, files.avatar_video)
                body = body.model_copy(update={"video_path": str(files.avatar_video)})
        else:
            body, uploaded = await _json_body(http, AvatarBody), frozenset()
        request = await anyio.to_thread.run_sync(_checked_avatar_request, service, body, uploaded)
    except BaseException:
        if files.upload_dir is not None:
            shutil.rmtree(files.upload_dir, ignore_errors=True)
        if files.avatar_video is not None:
            files.avatar_video.unlink(missing_ok=True)
        raise
    job = service.submit(AvatarTask(request), files)
    await wait_for(service, job, http)
    _raise_failure(job)
    return JSONResponse({**job.result.to_dict(), "job_id": job.id}, status_code=201)


def _checked_avatar_request(service: Service, body: AvatarBody, uploaded: frozenset[str]) -> LipsyncRequest:
    video = _input_path(service.paths, body.video_path, "video_path", trusted="video_path" in uploaded)
    options = body.model_dump(include=set(_PREP_FIELDS))
    request = _request(service.settings, video=video, audio=Path(), output=Path(), options=options)
    info = probe_video(video)
    _check_video(info, service.settings.limits, None if request.face_box else service.settings.face.detect_max_side)
    return request


@router.get("/avatars", response_model=AvatarList, responses=_errors(401, 503))
async def list_avatars(http: Request) -> dict:
    """The prepared avatars, most recently used first."""
    pipeline = _service(http).require_loaded()
    return {"avatars": [avatar_summary(row) for row in pipeline.list_avatars()]}


@router.get("/avatars/{avatar_id}", response_model=AvatarResponse, responses=_errors(401, 404, 503))
async def get_avatar(avatar_id: str, http: Request) -> dict:
    return avatar_summary(_find_avatar(_service(http).require_loaded(), avatar_id))


@router.delete("/avatars/{avatar_id}", responses=_errors(401, 404, 503))
async def delete_avatar(avatar_id: str, http: Request) -> dict:
    """Forget a prepared avatar (memory and disk) and its uploaded video."""
    service = _service(http)
    pipeline = service.require_loaded()
    _find_avatar(pipeline, avatar_id)
    pipeline.delete_avatar(avatar_id)
    await anyio.to_thread.run_sync(service.collect_avatar_videos)
    return {"avatar_id": avatar_id, "deleted": True}


def _find_avatar(pipeline: Any, avatar_id: str) -> dict:
    if is_avatar_key(avatar_id):
        for row in pipeline.list_avatars():
            if row.get("key") == avatar_id:
                return row
    shown = avatar_id if len(avatar_id) <= 64 else avatar_id[:64] + "..."
    raise AvatarNotFound(f"avatar_id: no prepared avatar {shown!r} (POST /avatars prepares one; GET /avatars lists them)")


# --- bodies -------------------------------------------------------------------------------------------


async def _json_body(http: Request, model: type[pydantic.BaseModel]) -> Any:
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


def _body_from_form(
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
    uploaded = set()
    for part, path_field in file_paths.items():
        if part in form.files:
            if data.get(path_field) is not None:
                raise InvalidOption(f"{path_field}: give a path or upload file {part!r}, not both")
            data[path_field] = str(form.files[part])
            uploaded.add(path_field)
    return _validate(model, data), frozenset(uploaded)


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
    options = body.model_dump(exclude={"video_path", "audio_path", "output_path", "avatar_id"})
    return _request(settings, video=video, audio=audio, output=output, options=options, avatar_id=body.avatar_id)


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


def check_limits(request: LipsyncRequest, settings: Settings, avatar: dict | None = None) -> None:
    """Probe both media and hold them to `settings.limits` (422 with a code naming the limit).

    The probe also fails a file that is not usable media, before it waits in the queue.
    """
    limits = settings.limits
    if avatar is not None:
        fps = _fraction(avatar["fps"])
        _check_size(int(avatar["width"]), int(avatar["height"]), limits)
    else:
        video = probe_video(request.video_path)
        _check_video(video, limits, None if request.face_box else settings.face.detect_max_side)
        fps = request.fps or float(video.fps)
        box = request.face_box
        if box is not None and (box[2] > video.width or box[3] > video.height):
            raise InvalidOption(
                f"face_box: {list(box)} reaches outside the {video.width}x{video.height} frame "
                "(x2 <= width, y2 <= height, in displayed pixels)"
            )
    audio = probe_audio(request.audio_path)
    if audio.duration_s > limits.max_audio_seconds:
        raise LimitExceeded(
            f"audio_path: the audio lasts {audio.duration_s:.1f} s, over the limit of {limits.max_audio_seconds:g} s "
            "(limits.max_audio_seconds)",
            code="audio_too_long",
        )
    frames = math.floor(audio.duration_s * float(fps))
    if frames > limits.max_frames:
        raise LimitExceeded(
            f"the output would have {frames} frames ({audio.duration_s:.1f} s at {float(fps):g} fps), over the "
            f"limit of {limits.max_frames} (limits.max_frames); send shorter audio or a lower fps",
            code="too_many_frames",
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


def _fraction(text: str) -> float:
    num, _, den = str(text).partition("/")
    return float(num) / float(den or 1)
