"""Jobs: submit a lip-sync (POST /jobs), list them (GET /jobs), follow, cancel and download one
(/jobs/{job_id}...), or submit one and wait for it (POST /lipsync)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from musetalk_service import work_folders
from musetalk_service.api.errors import error_response
from musetalk_service.api.jobs import Job, JobNotFound, JobStatus
from musetalk_service.api.requests import checked_request
from musetalk_service.api.routes.common import LIPSYNC_FILES, SUBMIT_ERRORS, body_doc, error_docs, get_service, raise_failure, read_body, wait_for
from musetalk_service.api.schemas import JobAccepted, JobList, JobResponse, LipsyncBody, LipsyncResponse
from musetalk_service.api.service import JobFiles, Service, job_view

router = APIRouter()

LIST_LIMIT, MAX_LIST_LIMIT = 50, 500
"""`GET /jobs`: jobs listed when the request names no `limit`, and the most it may ask for."""


@router.post(
    "/jobs", status_code=202, response_model=JobAccepted, responses=SUBMIT_ERRORS,
    openapi_extra=body_doc(LipsyncBody, LIPSYNC_FILES),
)
async def submit_job(http: Request) -> Response:
    """Queue a lip-sync (same body as `POST /lipsync`); 202 at once with the job's `status_url`."""
    service = get_service(http)
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


@router.get("/jobs", response_model=JobList, responses=error_docs(400, 401))
async def list_jobs(
    http: Request,
    status: Annotated[JobStatus | None, Query(description="Only the jobs in this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT, description="The most jobs to list.")] = LIST_LIMIT,
) -> dict:
    """The jobs kept (queued, running, and finished ones for `jobs.keep_finished_s`), newest first,
    each as `GET /jobs/{job_id}` shows it."""
    snapshots = get_service(http).jobs.snapshots(status, limit)
    return {"jobs": [job_view(snapshot) for snapshot in snapshots]}


@router.get("/jobs/{job_id}", response_model=JobResponse, responses=error_docs(401, 404))
async def get_job(job_id: str, http: Request) -> dict:
    """Status (queued, running, succeeded, failed, cancelled), phase, frames done of total,
    timings so far, and the result or the error."""
    return job_view(get_service(http).jobs.snapshot(job_id))


@router.delete("/jobs/{job_id}", response_model=JobResponse, responses={202: {"model": JobResponse}, **error_docs(401, 404)})
async def cancel_job(job_id: str, http: Request) -> JSONResponse:
    """Cancel: a queued job ends at once (200); a running one stops at its next batch, its ffmpeg
    ended and partial files removed (202 with `cancel_requested`). A finished job is left as it is."""
    jobs = get_service(http).jobs
    jobs.cancel(job_id)
    view = job_view(jobs.snapshot(job_id))
    return JSONResponse(view, status_code=202 if view["status"] == "running" else 200)


@router.get(
    "/jobs/{job_id}/output",
    responses={200: {"content": {"video/mp4": {}}, "description": "The MP4."}, **error_docs(401, 404, 409)},
)
async def job_output(job_id: str, http: Request) -> Response:
    """Download a succeeded lip-sync's MP4 (while the job is kept: `jobs.keep_finished_s`)."""
    job = get_service(http).jobs.get(job_id)
    if not job.done.is_set() or job.status is not JobStatus.SUCCEEDED or not hasattr(job.result, "output_path"):
        return error_response(409, "no_output", f"job {job_id} has no output: it is {job.status.value}")
    path = Path(job.result.output_path)
    if not path.is_file():
        return error_response(404, "output_gone", f"job {job_id}'s output is no longer on the server")
    return FileResponse(path, media_type="video/mp4", filename=path.name)


@router.post(
    "/lipsync", response_model=LipsyncResponse, responses={**SUBMIT_ERRORS, **error_docs(499, 504, 507)},
    openapi_extra=body_doc(LipsyncBody, LIPSYNC_FILES),
)
async def lipsync(http: Request) -> Any:
    """Lip-sync a video (or a prepared avatar) to a speech track and wait for it: a job like
    `POST /jobs`, waited for here. If the client goes away first, the job is cancelled."""
    service = get_service(http)
    job = await _submit_lipsync(service, http)
    await wait_for(service, job, http)
    raise_failure(job)
    return {**job.result.to_dict(), "job_id": job.id}


async def _submit_lipsync(service: Service, http: Request) -> Job:
    service.require_loaded()
    files = JobFiles()
    try:
        body, uploaded, _ = await read_body(http, service, files, LipsyncBody, LIPSYNC_FILES)
        request, frames = await anyio.to_thread.run_sync(checked_request, service, body, uploaded)
        if body.output_path is None:
            files.auto_output = request.request.output_path
    except BaseException:
        if files.upload_dir is not None:
            work_folders.remove(files.upload_dir)
        raise
    return service.submit(request, files, frames_total=frames)
