"""What the route modules share: OpenAPI error and body documentation, the `Service`, reading a
job's body (JSON or multipart with uploads), and waiting for a job the request itself waits on."""

from __future__ import annotations

from typing import Any

import anyio
import pydantic
from fastapi import Request

from musetalk_service.api.jobs import Job, ShuttingDown
from musetalk_service.api.requests import body_from_form, json_body
from musetalk_service.api.schemas import ErrorResponse
from musetalk_service.api.service import JobFiles, Service
from musetalk_service.api.uploads import ReceivedForm, is_multipart, receive_form


def error_docs(*statuses: int) -> dict:
    """OpenAPI `responses` for these error statuses: the `ErrorResponse` model and what each means."""
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


def body_doc(model: type[pydantic.BaseModel], files: dict[str, str]) -> dict:
    """OpenAPI: the body is JSON (`model`), or multipart (the routes read it themselves) with file
    parts `files` (part -> the path field it fills), any field of `model` as a form field, or all of
    them as one JSON object in field `options`."""
    fields = body_schema(model)["properties"]
    parts: dict[str, Any] = {
        part: {"type": "string", "format": "binary", "description": f"An upload instead of `{path}`."}
        for part, path in files.items()
    }
    for name, field in fields.items():
        parts[name] = _form_field(field)
    parts["options"] = {
        "type": "string",
        "contentMediaType": "application/json",
        "description": f"All the other fields of {model.__name__} as one JSON object, e.g. `{{\"batch_size\": 8}}`.",
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                "multipart/form-data": {"schema": {"type": "object", "properties": parts}},
            },
        }
    }


def body_schema(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema (its `$defs` referred to as components) with the rules the service
    checks itself: paths and ids are non-empty (else 400 `invalid_path` / `avatar_not_found`), and a
    lip-sync names exactly one of `video_path` and `avatar_id` (else 400 `invalid_option`)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, field in schema["properties"].items():
        if name.endswith("_path") or name == "avatar_id":
            for choice in field.get("anyOf", [field]):
                if choice.get("type") == "string":
                    choice["minLength"] = 1
    if {"video_path", "avatar_id"} <= schema["properties"].keys():
        schema["oneOf"] = [
            {"required": [name], "properties": {name: {"type": "string"}}} for name in ("video_path", "avatar_id")
        ]
    return schema


def _form_field(field: dict[str, Any]) -> dict[str, Any]:
    """A body field as a form field: a scalar keeps its schema (a form can't send null); anything
    else is sent as its JSON text."""
    choices = [c for c in field.get("anyOf", [field]) if c.get("type") != "null"]
    description = field.get("description", "")
    if len(choices) == 1 and choices[0].get("type") in ("string", "integer", "number", "boolean"):
        return {**choices[0], "description": description}
    return {"type": "string", "contentMediaType": "application/json", "description": f"As JSON text. {description}"}


LIPSYNC_FILES = {"video": "video_path", "audio": "audio_path"}
"""The upload parts of a lip-sync body, and the path field each fills."""
AVATAR_FILES = {"video": "video_path"}

SUBMIT_ERRORS = error_docs(400, 401, 403, 404, 413, 422, 429, 503, 500)


async def read_body(
    http: Request, service: Service, files: JobFiles, model: type[pydantic.BaseModel], file_paths: dict[str, str]
) -> tuple[Any, frozenset[str], ReceivedForm | None]:
    """The job's options as `model`, from a JSON body, or from a multipart form whose files
    (`file_paths`: form field -> body field) are saved in a new upload folder recorded in `files`.
    Returns the body, the body fields an upload filled, and the form (None for JSON)."""
    if not is_multipart(http):
        return await json_body(http, model), frozenset(), None
    files.upload_dir = service.upload_folder()
    form = await receive_form(
        http, files.upload_dir, max_bytes=service.settings.limits.max_upload_bytes, file_fields=tuple(file_paths)
    )
    body, uploaded = body_from_form(form, model, file_paths)
    return body, uploaded, form


def get_service(http: Request) -> Service:
    """The app's `Service` (built by `create_app`)."""
    return http.app.state.service


def raise_failure(job: Job) -> None:
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
