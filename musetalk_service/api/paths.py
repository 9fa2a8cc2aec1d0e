"""Which paths a request may read and write: inputs under input roots, outputs under output roots.

Every path is resolved with `os.path.realpath` (symlinks followed, `..` applied) before it is
compared, component by component, with the roots (also resolved, once, at construction), so
`../../etc/passwd`, an absolute path elsewhere, a symlink pointing out of a root, or a sibling
that merely shares a prefix (`/data/in2` vs `/data/in`) are all refused with 403
`path_not_allowed`. The checked, resolved path is returned; use it, not the string the client
sent. Relative paths resolve against the process's working directory.

An empty roots list means no restriction for that side (a local or trusted deployment); the
other checks (input exists and is a regular file; output's folder exists, is writable, and the
output is not a directory) still apply.

Containment is checked before existence, so a path outside the roots gets the same 403 whether
or not it exists (no probing of the host's files). Messages name the request field and repeat
the path as sent (quoted, shortened), never a symlink's target or a file's contents.

Left open: a client that can write inside a root can swap a checked folder for a symlink before
the pipeline opens the file; roots should not be writable by untrusted parties.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from musetalk_service.errors import InputError, InputFileNotFound, OutputNotWritable, ServiceError

_SHOWN_CHARS = 200
_NAME_MAX, _PATH_MAX = 255, 4096
"""Linux's limits on a file name and a whole path, in bytes (what ENAMETOOLONG means)."""


class PathNotAllowed(ServiceError):
    code = "path_not_allowed"
    status = 403


def _show(given: str) -> str:
    text = given if len(given) <= _SHOWN_CHARS else given[:_SHOWN_CHARS] + "..."
    return repr(text)


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


class PathPolicy:
    """Checks request paths against configured roots (see the module doc)."""

    def __init__(self, input_roots: Iterable[str | os.PathLike] = (), output_roots: Iterable[str | os.PathLike] = ()):
        self.input_roots = tuple(self._root(r, "input") for r in input_roots)
        self.output_roots = tuple(self._root(r, "output") for r in output_roots)

    @staticmethod
    def _root(root: str | os.PathLike, kind: str) -> Path:
        real = Path(os.path.realpath(root))
        if not real.is_dir():
            raise ValueError(f"{kind} root {str(root)!r} is not an existing folder; create it or fix {kind}_roots")
        return real

    def check_input(self, path: str | os.PathLike, field: str) -> Path:
        """The resolved path of an existing regular file under an input root, or an error:
        403 path_not_allowed, 400 file_not_found (missing, or a folder/device/FIFO)."""
        given, real = self._resolve(path, field)
        if self.input_roots and not _under(real, self.input_roots):
            raise PathNotAllowed(f"{field}: {_show(given)} is outside the allowed input folders (input_roots)")
        self._check_length(real, field)
        if not real.exists():
            raise InputFileNotFound(f"{field}: file not found: {_show(given)}")
        if not real.is_file():
            raise InputFileNotFound(f"{field}: {_show(given)} is not a regular file")
        return real

    def check_output(self, path: str | os.PathLike, field: str) -> Path:
        """The resolved path to write, under an output root, in an existing writable folder, and
        not a directory or other non-file; creates nothing. Errors: 403 path_not_allowed,
        400 output_not_writable."""
        given, real = self._resolve(path, field)
        if given.endswith(("/", os.sep)):
            raise OutputNotWritable(f"{field}: {_show(given)} names a folder; give a file path such as out.mp4")
        if self.output_roots and not _under(real, self.output_roots):
            raise PathNotAllowed(f"{field}: {_show(given)} is outside the allowed output folders (output_roots)")
        self._check_length(real, field)
        if real.is_dir():
            raise OutputNotWritable(f"{field}: {_show(given)} is a folder; give a file path such as out.mp4")
        if real.exists() and not real.is_file():
            raise OutputNotWritable(f"{field}: {_show(given)} exists and is not a regular file")
        if not real.parent.is_dir():
            raise OutputNotWritable(f"{field}: the folder of {_show(given)} does not exist; create it first")
        if not os.access(real.parent, os.W_OK | os.X_OK):
            raise OutputNotWritable(f"{field}: the folder of {_show(given)} is not writable by the service")
        return real

    @staticmethod
    def _resolve(path: str | os.PathLike, field: str) -> tuple[str, Path]:
        given = os.fspath(path)
        if not isinstance(given, str) or not given:
            raise InputError(f"{field}: give a non-empty path", code="invalid_path", status=400)
        if "\x00" in given:
            raise InputError(f"{field}: the path contains a NUL character", code="invalid_path", status=400)
        try:
            os.fsencode(given)
        except UnicodeEncodeError:
            raise InputError(f"{field}: the path is not valid text (a lone UTF-16 surrogate)", code="invalid_path", status=400) from None
        try:
            real = Path(os.path.realpath(given))
        except (OSError, ValueError):
            raise PathNotAllowed(f"{field}: {_show(given)} cannot be resolved") from None
        return given, real

    @staticmethod
    def _check_length(real: Path, field: str) -> None:
        """Path.exists() and is_dir() raise on a name the filesystem can't hold: refuse it first."""
        try:
            os.lstat(real)
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise InputError(
                    f"{field}: the path is too long for the filesystem (at most {_NAME_MAX} bytes a name, "
                    f"{_PATH_MAX} in all)", code="invalid_path", status=400,
                ) from None
