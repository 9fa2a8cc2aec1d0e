"""HTTP routes: POST /lipsync and GET /health."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from fastapi import APIRouter, Request

from musetalk_service.api.schemas import ErrorResponse, HealthResponse, LipsyncBody, LipsyncResponse
from musetalk_service.errors import InputFileNotFound, OutputNotWritable
from musetalk_service.pipeline.request import LipsyncRequest
from musetalk_service.settings import Settings

router = APIRouter()

_ERRORS = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "A missing input file, an unusable output path, a bad option value or a malformed body."),
        (422, "Media the pipeline can't use: not a video, no video stream, unreadable or empty audio, no face."),
        (500, "A fault of the service itself."),
    )
}


@router.post("/lipsync", response_model=LipsyncResponse, responses=_ERRORS)
async def lipsync(body: LipsyncBody, http: Request) -> dict:
    """Lip-sync a video to a speech track; waits its turn on the models and returns the MP4's path and timings."""
    request = prepare_request(body, http.app.state.settings)
    result = await http.app.state.slot.run(request)
    return result.to_dict()


@router.get("/health", response_model=HealthResponse)
async def health(http: Request) -> dict:
    """The device, the weights (random|official|custom) and the encoder in use; 200 once the models are loaded."""
    return {"status": "ok", **http.app.state.slot.pipeline.health()}


def prepare_request(body: LipsyncBody, settings: Settings) -> LipsyncRequest:
    """The request with the configured defaults filled in, once its paths are known to be usable.

    Paths are checked here, before the request waits for the models, so a typo fails in
    milliseconds; the pipeline probes the media itself.
    """
    video, audio = Path(body.video_path), Path(body.audio_path)
    _check_input_file("video_path", video)
    _check_input_file("audio_path", audio)
    if body.output_path is not None:
        output = Path(body.output_path)
    else:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        output = settings.output_dir / f"{video.stem}_{audio.stem}_{uuid.uuid4().hex[:8]}.mp4"
    _check_output_path(output)
    options = body.model_dump(exclude={"video_path", "audio_path", "output_path"})
    return LipsyncRequest.with_defaults(settings.lipsync, video_path=video, audio_path=audio, output_path=output, **options)


def _check_input_file(field: str, path: Path) -> None:
    """Fail early, naming the request field, when an input path is not an existing file."""
    if not path.exists():
        raise InputFileNotFound(f"{field}: no such file: {path}")
    if not path.is_file():
        raise InputFileNotFound(f"{field}: not a file: {path}")


def _check_output_path(path: Path) -> None:
    """Fail before any model work when the output can't be written where it was asked for."""
    if path.is_dir():
        raise OutputNotWritable(f"output_path: {path} is a directory; name a file such as {path / 'out.mp4'}")
    parent = path.parent
    if not parent.is_dir():
        raise OutputNotWritable(f"output_path: {path}: directory {parent} does not exist; create it first")
    # Try it rather than trust permission bits: root ignores them, read-only mounts don't.
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OutputNotWritable(f"output_path: {path}: can't write in {parent}: {e.strerror}") from e
