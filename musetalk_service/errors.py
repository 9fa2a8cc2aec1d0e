"""Errors shared by every layer.

`ServiceError` carries a stable machine-readable `code` and an HTTP `status`, so the API can turn
any failure into `{error: {code, message}}` without knowing where it came from. Input problems are
4xx and say what to change; faults of the service itself are 5xx. Every error pickles with its
fields (a remote engine raises them in another process).
"""

from __future__ import annotations


class ServiceError(Exception):
    """A failure with a stable code and the HTTP status it maps to."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    def __reduce__(self) -> tuple[object, ...]:
        # Exception pickles as cls(*args), which loses keyword fields (code, returncode, ...).
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[ServiceError], message: str, state: dict[str, object]) -> ServiceError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InputError(ServiceError):
    """The request is wrong: a missing or unreadable file, a bad option value, media we can't use."""

    code = "invalid_input"
    status = 422


class InputFileNotFound(InputError):
    code = "file_not_found"
    status = 400


class InvalidOption(InputError):
    code = "invalid_option"
    status = 400


class NotAVideo(InputError):
    code = "not_a_video"


class NoVideoStream(InputError):
    code = "no_video_stream"


class BadAudio(InputError):
    code = "bad_audio"


class NoFace(InputError):
    code = "no_face"


class OutputNotWritable(InputError):
    code = "output_not_writable"
    status = 400


class AvatarNotFound(InputError):
    code = "avatar_not_found"
    status = 404


class Cancelled(ServiceError):
    """The job was cancelled by its client or by shutdown."""

    code = "cancelled"
    status = 499


class FFmpegError(ServiceError):
    """ffmpeg exited non-zero; the message carries the return code and the tail of its stderr."""

    code = "ffmpeg_failed"
    status = 500

    def __init__(self, message: str, *, returncode: int | None = None, stderr_tail: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class GpuMemoryExhausted(ServiceError):
    """A request needed more GPU memory than the cap (`gpu_memory_gb`) or the device has."""

    code = "gpu_memory_exhausted"
    status = 503


class WeightsError(ServiceError):
    """Weights are missing or malformed; the message names the file and the command that fixes it."""

    code = "weights_error"
    status = 500
