"""Multipart uploads (curl `-F video=@clip.mp4`): files stream straight to disk, with a byte limit.

`receive_form` reads a `multipart/form-data` body into a folder of its own: each file part named in
`file_fields` becomes `<folder>/<field><ext>` (the client's file name is never used as a path; only
a short alphanumeric extension is kept, which helps ffmpeg with raw formats), every other part is a
text field. The whole body may hold at most `max_bytes` (413 `upload_too_large`, answered before
reading when Content-Length already says so). On any failure the folder is removed; on success the
caller owns it.
"""

from __future__ import annotations

import codecs
import errno
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from musetalk_service import work_folders
from musetalk_service.api.errors import BadUpload, DiskFull, UploadTooLarge

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
_EXT = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


@dataclass
class ReceivedForm:
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    """Field name -> the saved file."""
    fields: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def _suffix(filename: str) -> str:
    ext = Path(filename.replace("\\", "/")).suffix
    return ext.lower() if _EXT.match(ext) else ""


def _limit_message(max_bytes: int) -> str:
    return f"the upload is larger than the limit of {max_bytes} bytes (limits.max_upload_bytes); send a smaller file"


class _Parts:
    """python-multipart callbacks: headers, text fields in memory, file data queued for writing."""

    def __init__(self, folder: Path, file_fields: Collection[str]):
        self.folder = folder
        self.file_fields = file_fields
        self.form = ReceivedForm(folder)
        self.pending: list[tuple[BinaryIO, bytes]] = []
        self._open: list[BinaryIO] = []
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._file: BinaryIO | None = None
        self._text = bytearray()
        self.error: Exception | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._grow("_header_name", d[s:e]),
            "on_header_value": lambda d, s, e: self._grow("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _grow(self, attr: str, data: bytes) -> None:
        value = getattr(self, attr) + data
        if len(value) > MAX_FIELD_BYTES:
            raise BadUpload("a multipart header is too long")
        setattr(self, attr, value)

    def _part_begin(self) -> None:
        self._disposition = b""
        self._name = ""
        self._file = None
        self._text = bytearray()

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise BadUpload("a multipart part has no name (Content-Disposition: form-data; name=...)")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self._name not in self.file_fields:
                expected = ", ".join(sorted(self.file_fields))
                raise BadUpload(f"unexpected file field {self._name!r}; upload files as: {expected}")
            if self._name in self.form.files:
                raise BadUpload(f"file field {self._name!r} was sent twice")
            filename = options[b"filename"].decode("utf-8", "replace")
            path = self.folder / f"{self._name}{_suffix(filename)}"
            self._file = open(path, "wb")  # noqa: SIM115 - closed in _part_end or close()
            self._open.append(self._file)
            self.form.files[self._name] = path
            self.form.sizes[self._name] = 0
        else:
            if self._name in self.file_fields:
                raise BadUpload(f"field {self._name!r} must be a file upload (curl: -F {self._name}=@FILE)")
            if len(self.form.fields) >= MAX_FIELDS:
                raise BadUpload(f"too many form fields (at most {MAX_FIELDS})")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._file is not None:
            self.pending.append((self._file, chunk))
            self.form.sizes[self._name] += len(chunk)
        else:
            if len(self._text) + len(chunk) > MAX_FIELD_BYTES:
                raise BadUpload(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")
            self._text.extend(chunk)

    def _part_end(self) -> None:
        if self._file is None:
            try:
                self.form.fields[self._name] = codecs.decode(bytes(self._text), "utf-8")
            except UnicodeDecodeError:
                raise BadUpload(f"form field {self._name!r} is not UTF-8 text") from None

    def close(self) -> None:
        for f in self._open:
            f.close()


def _write(pending: list[tuple[BinaryIO, bytes]]) -> None:
    for f, chunk in pending:
        f.write(chunk)


async def receive_form(request: Request, folder: Path, *, max_bytes: int, file_fields: Collection[str]) -> ReceivedForm:
    """Stream the multipart body of `request` into `folder` (created here; removed on failure)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise UploadTooLarge(_limit_message(max_bytes))
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadUpload("multipart/form-data without a boundary")
    folder.mkdir(parents=True, exist_ok=True)  # made and held by the service (work_folders.make)
    parts = _Parts(folder, file_fields)
    received = 0
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise UploadTooLarge(_limit_message(max_bytes))
            parser.write(chunk)
            if parts.pending:
                pending, parts.pending = parts.pending, []
                # Disk writes off the event loop; one hop per network chunk.
                await anyio.to_thread.run_sync(_write, pending)
        parser.finalize()
        parts.close()
        return parts.form
    except FormParserError as e:
        _discard(parts, folder)
        raise BadUpload(f"malformed multipart body: {e}") from None
    except OSError as e:
        _discard(parts, folder)
        if e.errno == errno.ENOSPC:
            raise DiskFull("no space left on the server's work disk for the upload; retry later") from None
        raise
    except BaseException:  # the client went away (ClientDisconnect), a limit, a cancel...
        _discard(parts, folder)
        raise


def _discard(parts: _Parts, folder: Path) -> None:
    parts.close()
    work_folders.remove(folder)
