"""Media by URL: sources fetched with GET, the output sent with PUT (e.g. presigned object-store URLs).

A request may name `video_url` and `audio_url` instead of paths, and `output_url` for the MP4.
At submit only the URLs are checked (`check_url`: http or https, a host in `urls.allowed_hosts`),
so a slow source never holds the HTTP handler; the job itself then fetches them into its own work
folder, holds them to the same limits as uploads (`limits.max_upload_bytes` while streaming, then
the probe's duration, size and frame limits), runs the lip-sync, PUTs the output (bounded retries,
doubling backoff) and removes the folder. `fetch_and_run` is that job step; the embedded service
and a Ray engine replica both call it, so media never has to pass through the ingress host.

Redirects are not followed (a redirect could leave the allowed hosts). Error messages show a URL
without its query string: a presigned URL's query is its credential.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from musetalk_service import work_folders
from musetalk_service.errors import Cancelled, InputError, InvalidOption, ServiceError
from musetalk_service.contract import LipsyncRequest, LipsyncResult, LipsyncTask
from musetalk_service.settings import UrlSettings

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_EXT = re.compile(r"^\.[A-Za-z0-9]{1,8}$")
_RETRIED_STATUSES = frozenset({408, 429})

ProgressFn = Callable[[str, int, int], None]
RunFn = Callable[[LipsyncRequest, "ProgressFn | None", "threading.Event | None"], LipsyncResult]


class UrlNotAllowed(InvalidOption):
    code = "url_not_allowed"


class SourceUnreachable(InputError):
    """The source's host did not answer (DNS, refused, timeout)."""

    code = "source_unreachable"


class SourceHttpError(InputError):
    """The source answered, but not with the file (4xx, 5xx, a redirect)."""

    code = "source_http_error"


class DownloadTooLarge(InputError):
    code = "download_too_large"
    status = 413


class UploadFailed(ServiceError):
    """The output could not be PUT to `output_url`: the job failed, the MP4 is not kept."""

    code = "output_upload_failed"
    status = 502


@dataclass(frozen=True)
class MediaUrls:
    video_url: str | None = None
    audio_url: str | None = None
    output_url: str | None = None
    callback_url: str | None = None

    def __bool__(self) -> bool:
        return any(dataclasses.astuple(self))


@dataclass(frozen=True, eq=False)
class UrlTask:
    """A lip-sync job whose media, output or final status travel by URL.

    `request` holds placeholders where a URL stands for a path; `fetch_and_run` replaces them with
    the fetched files. `avatar` is the prepared avatar's summary when `request.avatar_id` is set
    (its size and fps are what the limits are checked against)."""

    request: LipsyncRequest
    urls: MediaUrls
    avatar: dict[str, Any] | None = None
    auto_output: bool = True
    """The request named no `output_path`: with `output_url` the MP4 is written to the work folder."""


@dataclass(frozen=True)
class UploadedResult:
    """A lip-sync result whose MP4 was PUT to `output_url` (and removed from the server)."""

    result: LipsyncResult
    uploaded_to: str
    """The target URL without its query string."""

    @property
    def output_path(self) -> Path:
        return self.result.output_path

    @property
    def frames(self) -> int:
        return self.result.frames

    @property
    def frames_generated(self) -> int:
        return self.result.frames_generated

    @property
    def frames_silent(self) -> int:
        return self.result.frames_silent

    @property
    def timings(self) -> dict[str, float]:
        return self.result.timings

    def to_dict(self) -> dict[str, Any]:
        return {**self.result.to_dict(), "output_uploaded_to": self.uploaded_to}


def shown(url: str) -> str:
    """The URL as it may appear in messages and results: no query, no fragment, no credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def check_url(url: str, field: str, settings: UrlSettings) -> str:
    """The URL if it may be used: http or https, a host in `urls.allowed_hosts`; else 400."""
    if not settings.allowed_hosts:
        raise UrlNotAllowed(f"{field}: URLs are not enabled on this server (urls.allowed_hosts is empty); send a path or a file")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
        httpx.URL(url)  # what the job will send it with: control characters, over-long URLs...
    except (ValueError, httpx.InvalidURL):
        raise InvalidOption(f"{field}: not a valid URL", code="invalid_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidOption(f"{field}: needs an http:// or https:// URL with a host", code="invalid_url")
    if not host_allowed(parts.hostname, settings.allowed_hosts):
        raise UrlNotAllowed(f"{field}: host {parts.hostname!r} is not in urls.allowed_hosts")
    return url


def media_urls(body: Any, settings: UrlSettings) -> MediaUrls:
    """The body's URL fields, each checked (`check_url`)."""
    fields = {f.name: getattr(body, f.name, None) for f in dataclasses.fields(MediaUrls)}
    return MediaUrls(**{name: check_url(url, name, settings) if url is not None else None for name, url in fields.items()})


def placeholder(url: str, stem: str) -> str:
    """The file a URL will be fetched to, named `<stem><ext>` with the URL's extension when it has a
    short one (ffmpeg reads raw formats by it); the folder is the job's, chosen when it runs."""
    ext = Path(urlsplit(url).path).suffix
    return stem + (ext.lower() if _EXT.match(ext) else "")


def _timeout(settings: UrlSettings) -> httpx.Timeout:
    return httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)


def download(url: str, dest: Path, *, field: str, max_bytes: int, settings: UrlSettings, cancel: threading.Event | None = None) -> int:
    """Stream `url` into `dest` (removed on failure); the bytes written. 4xx errors name `field`."""
    where = shown(url)
    received = 0
    try:
        with httpx.stream("GET", url, timeout=_timeout(settings), follow_redirects=False) as response:
            if response.status_code != 200:
                hint = " (redirects are not followed)" if 300 <= response.status_code < 400 else ""
                raise SourceHttpError(f"{field}: {where} answered HTTP {response.status_code}{hint}")
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise DownloadTooLarge(_too_large(field, where, max_bytes))
            with open(dest, "wb") as out:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    received += len(chunk)
                    if received > max_bytes:
                        raise DownloadTooLarge(_too_large(field, where, max_bytes))
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("job cancelled while fetching its media")
                    out.write(chunk)
    except httpx.TransportError as e:
        dest.unlink(missing_ok=True)
        raise SourceUnreachable(f"{field}: could not fetch {where}: {type(e).__name__}") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return received


def _too_large(field: str, where: str, max_bytes: int) -> str:
    return f"{field}: {where} is larger than the limit of {max_bytes} bytes (limits.max_upload_bytes)"


def _file_chunks(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def upload(path: Path, url: str, settings: UrlSettings, *, sleep: Callable[[float], None] = time.sleep) -> None:
    """PUT the file to `url`; connection errors, 408, 429 and 5xx are retried `urls.upload_attempts`
    times in all with doubling backoff, any other answer but 2xx fails at once (`UploadFailed`)."""
    where = shown(url)
    size = path.stat().st_size
    last = ""
    for attempt in range(settings.upload_attempts):
        if attempt:
            sleep(settings.retry_backoff_s * 2 ** (attempt - 1))
        try:
            response = httpx.put(
                url,
                content=_file_chunks(path),
                headers={"Content-Type": "video/mp4", "Content-Length": str(size)},
                timeout=_timeout(settings),
            )
        except httpx.TransportError as e:
            last = type(e).__name__
        else:
            if response.is_success:
                return
            last = f"HTTP {response.status_code}"
            if response.status_code < 500 and response.status_code not in _RETRIED_STATUSES:
                break
        log.warning("output upload to %s failed (try %d of %d): %s", where, attempt + 1, settings.upload_attempts, last)
    raise UploadFailed(f"output_url: the MP4 could not be uploaded to {where}: {last}")


def fetch_and_run(
    run: RunFn,
    task: UrlTask,
    *,
    folder: Path,
    max_bytes: int,
    settings: UrlSettings,
    check: Callable[[LipsyncRequest, dict[str, Any] | None], LipsyncTask],
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> LipsyncResult | UploadedResult:
    """The job step of a `UrlTask`: fetch its media into `folder` (created here, removed at the
    end), `check` them (the probe limits; the result gets the check's warnings), `run` the
    lip-sync, PUT the output to `output_url`."""
    urls = task.urls
    folder.mkdir(parents=True, exist_ok=True)  # made and held by the service (work_folders.make)
    try:
        request = task.request
        fetched: dict[str, Any] = {}
        for field, url, path in (("video_url", urls.video_url, request.video_path), ("audio_url", urls.audio_url, request.audio_path)):
            if url is None:
                continue
            if progress is not None:
                progress("fetch", 0, 0)
            dest = folder / Path(str(path)).name
            download(url, dest, field=field, max_bytes=max_bytes, settings=settings, cancel=cancel)
            fetched[field.replace("_url", "_path")] = dest
        if urls.output_url is not None and task.auto_output:
            fetched["output_path"] = folder / "output.mp4"
        request = dataclasses.replace(request, **fetched)
        checked = check(request, task.avatar)
        result = run(request, progress, cancel).with_warnings(checked.warnings)
        if urls.output_url is None:
            return result
        if progress is not None:
            progress("upload", 0, 0)
        upload(Path(result.output_path), urls.output_url, settings)
        return UploadedResult(result, shown(urls.output_url))
    finally:
        work_folders.remove(folder)
