"""Avatars: prepare a video ahead of time (POST /avatars), list, show and forget them."""

from __future__ import annotations

import shutil

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from musetalk_service import work_folders
from musetalk_service.api.requests import checked_avatar_request, find_avatar
from musetalk_service.api.routes.common import AVATAR_FILES, SUBMIT_ERRORS, body_doc, error_docs, get_service, raise_failure, read_body, wait_for
from musetalk_service.api.schemas import AvatarBody, AvatarList, AvatarResponse
from musetalk_service.api.service import AvatarTask, JobFiles, avatar_summary

router = APIRouter()


@router.post(
    "/avatars", status_code=201, response_model=AvatarResponse, responses={**SUBMIT_ERRORS, **error_docs(499, 504, 507)},
    openapi_extra=body_doc(AvatarBody, AVATAR_FILES),
)
async def create_avatar(http: Request) -> JSONResponse:
    """Prepare a video ahead of time (face boxes, latents, blend masks) and keep it in the avatar
    cache; name the returned `avatar_id` in lip-sync requests instead of `video_path`. Runs as a job
    on the GPU queue, waited for here (cancelled if the client goes away)."""
    service = get_service(http)
    service.require_loaded()
    files = JobFiles()
    try:
        body, uploaded, form = await read_body(http, service, files, AvatarBody, AVATAR_FILES)
        if uploaded:
            # The avatar refers to its video for every later request: keep it outside the upload folder.
            staged = form.files["video"]
            files.avatar_video = service.avatar_video_path(staged.suffix)
            shutil.move(staged, files.avatar_video)
            body = body.model_copy(update={"video_path": str(files.avatar_video)})
        request = await anyio.to_thread.run_sync(checked_avatar_request, service, body, uploaded)
    except BaseException:
        if files.upload_dir is not None:
            work_folders.remove(files.upload_dir)
        if files.avatar_video is not None:
            files.avatar_video.unlink(missing_ok=True)
        raise
    job = service.submit(AvatarTask(request), files)
    await wait_for(service, job, http)
    raise_failure(job)
    return JSONResponse({**job.result.to_dict(), "job_id": job.id}, status_code=201)


@router.get("/avatars", response_model=AvatarList, responses=error_docs(401, 503))
async def list_avatars(http: Request) -> dict:
    """The prepared avatars, most recently used first."""
    pipeline = get_service(http).require_loaded()
    return {"avatars": [avatar_summary(row) for row in pipeline.list_avatars()]}


@router.get("/avatars/{avatar_id}", response_model=AvatarResponse, responses=error_docs(401, 404, 503))
async def get_avatar(avatar_id: str, http: Request) -> dict:
    return avatar_summary(find_avatar(get_service(http).require_loaded(), avatar_id))


@router.delete("/avatars/{avatar_id}", responses=error_docs(401, 404, 503))
async def delete_avatar(avatar_id: str, http: Request) -> dict:
    """Forget a prepared avatar (memory and disk) and its uploaded video."""
    service = get_service(http)
    pipeline = service.require_loaded()
    find_avatar(pipeline, avatar_id)
    pipeline.delete_avatar(avatar_id)
    await anyio.to_thread.run_sync(service.collect_avatar_videos)
    return {"avatar_id": avatar_id, "deleted": True}
