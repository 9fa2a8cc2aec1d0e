"""The ffmpeg binary and the one way this service runs it.

Every ffmpeg process goes through `FFmpegPipe`: an argument list (never a shell, so paths with
spaces or quotes are safe), stderr drained on a thread into a bounded buffer (a chatty ffmpeg can
fill the 64 KiB pipe buffer and block forever otherwise), and on any exit path the process is
either waited for or killed, and always reaped. A non-zero exit becomes `errors.FFmpegError`
carrying the return code and the tail of stderr.

No ffmpeg outlives this process, even one killed by SIGKILL or the OOM killer: on Linux each is
started with the parent-death signal (SIGKILL) armed, by `start_child` (one long-lived thread).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from musetalk_service.errors import FFmpegError, OutputNotWritable

logger = logging.getLogger(__name__)

STDERR_KEEP_BYTES = 64 * 1024
"""How much of ffmpeg's stderr is kept (the most recent bytes); the rest is counted, not stored."""

_TAIL_CHARS = 2000
_DYING_GRACE_S = 10.0


def find_ffmpeg(configured: str | None = None) -> str:
    """The ffmpeg binary: `configured` (a path or a name on PATH), else `ffmpeg` on PATH, else
    the static binary that the imageio-ffmpeg package ships."""
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise FFmpegError(f"configured ffmpeg {configured!r} does not exist or is not executable")
        return found
    on_path = shutil.which("ffmpeg")
    if on_path is not None:
        return on_path
    import imageio_ffmpeg  # local: only needed where no ffmpeg is installed

    return imageio_ffmpeg.get_ffmpeg_exe()


def file_arg(path: str | os.PathLike) -> str:
    """`path` as an ffmpeg input/output argument.

    The `file:` protocol prefix and an absolute path stop ffmpeg from reading a name that starts
    with `-` as an option or a name with a colon (`a:b.mp4`) as a protocol.
    """
    return "file:" + os.path.abspath(os.fspath(path))


def ensure_writable_dir(output_path: str | os.PathLike) -> Path:
    """Check that `output_path` can be created: its directory exists and is writable, and the path
    itself is not a directory. Raises `OutputNotWritable`; returns the path as a `Path`."""
    out = Path(output_path)
    parent = out.parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "does not exist"
        raise OutputNotWritable(f"cannot write {out}: {parent} {problem}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritable(f"cannot write {out}: directory {parent} is not writable")
    if out.is_dir():
        raise OutputNotWritable(f"cannot write {out}: it is a directory")
    return out


def ffmpeg_command(ffmpeg: str, args: list[str], *, uses_stdin: bool, loglevel: str = "error") -> list[str]:
    """The full argument list: the flags every invocation needs, then `args`.

    `-nostdin` keeps an ffmpeg that doesn't read a pipe from ever touching the terminal; `-y`
    because outputs are always paths this service chose (temp names or explicit outputs).
    """
    head = [ffmpeg, "-hide_banner", "-loglevel", loglevel, "-y"]
    if not uses_stdin:
        head.append("-nostdin")
    return head + [str(a) for a in args]


def describe_returncode(returncode: int | None) -> str:
    """'exit code 1' or 'killed by SIGKILL' (Popen reports a signal as a negative code)."""
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> Any:
    """libc's prctl, resolved now: the child calls it between fork and exec, where loading a
    library is not safe. None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def _die_with_parent(parent_pid: int) -> None:
    """In the child, before exec: be sent SIGKILL when the parent goes, and go now if it has
    already gone (it may have died between the fork and this call)."""
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


class _ChildStarter:
    """Starts child processes from one thread that lives as long as the process.

    Linux sends the parent-death signal when the *thread* that forked the child ends, not the
    process. The service starts ffmpeg from job, pool and request threads that end while their
    ffmpeg still runs (a segment encoder outlives the pool task that started it): armed from
    those, the signal would kill a working ffmpeg. From this thread it fires only when the
    process itself is gone. Forking from one thread also serialises the forks.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue | None = None
        self._owner_pid = 0

    def popen(self, command: list[str], **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            # After a fork this thread does not exist in the child: start its own.
            if self._requests is None or self._owner_pid != os.getpid():
                self._requests = queue.SimpleQueue()
                self._owner_pid = os.getpid()
                threading.Thread(target=self._serve, args=(self._requests,), name="musetalk-child-starter", daemon=True).start()
            requests = self._requests
        started: concurrent.futures.Future[subprocess.Popen] = concurrent.futures.Future()
        requests.put((command, kwargs, started))
        return started.result()

    @staticmethod
    def _serve(requests: queue.SimpleQueue) -> None:
        while True:
            command, kwargs, started = requests.get()
            try:
                started.set_result(subprocess.Popen(command, preexec_fn=functools.partial(_die_with_parent, os.getpid()), **kwargs))
            except BaseException as e:  # noqa: BLE001 - the caller's error (no such binary, no memory)
                started.set_exception(e)


_starter = _ChildStarter()


def start_child(command: list[str], **kwargs: Any) -> subprocess.Popen:
    """`subprocess.Popen(command, **kwargs)` (never a shell) for a child that dies with this process.

    On Linux it is forked by one long-lived thread with the parent-death signal armed (see
    `_ChildStarter`); elsewhere it is a plain Popen, and ends only when its pipes break.
    """
    if _prctl is None:
        return subprocess.Popen(command, **kwargs)
    return _starter.popen(command, **kwargs)


_PIPE_BYTES = 1 << 20


def _grow_pipe(fd: int) -> None:
    """Give a pipe we read frames from a 1 MB buffer (Linux; capped by fs.pipe-max-size).

    A read returns at most what the pipe holds: 64 KB by default, about 95 reads per 1080p BGR
    frame, and each read gives up and takes back the GIL, which the GPU thread needs to launch its
    kernels (with two decoders reading beside it on the H100 box its busy time doubled). Where the
    pipe cannot grow the default stays: only speed depends on it.
    """
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    try:
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        fcntl.fcntl(fd, set_size, min(_PIPE_BYTES, limit))
    except (OSError, ValueError):
        logger.debug("pipe buffer left at its default size", exc_info=True)


class FFmpegPipe:
    """One ffmpeg process, as a context manager.

    `stdin=True` gives a pipe to write to (`write`), `stdout=True` one to read from (`readinto`,
    `read_all`). Leaving the block normally calls `finish()` (close stdin, wait, raise
    `FFmpegError` on a non-zero exit); leaving it with an exception calls `kill()`. A reader that
    stops before ffmpeg's stdout is exhausted must call `kill()` itself, since ffmpeg would block
    writing to it and `finish()` would wait forever.
    """

    def __init__(
        self,
        ffmpeg: str,
        args: list[str],
        *,
        stdin: bool = False,
        stdout: bool = False,
        loglevel: str = "error",
        what: str = "ffmpeg",
    ):
        self.command = ffmpeg_command(ffmpeg, args, uses_stdin=stdin, loglevel=loglevel)
        self.what = what
        self._want_stdin = stdin
        self._want_stdout = stdout
        self._proc: subprocess.Popen | None = None
        self._stderr_thread: threading.Thread | None = None
        self._stderr_buf = bytearray()
        self._stderr_total = 0
        self._stderr_lock = threading.Lock()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> FFmpegPipe:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.kill()

    def start(self) -> None:
        """Start the process (the context manager does this)."""
        logger.debug("starting %s: %s", self.what, shlex.join(self.command))
        # close_fds (the default, kept explicit) matters: a decoder started while an encoder runs
        # must not inherit the encoder's stdin write end, or the encoder would never see EOF.
        self._proc = start_child(
            self.command,
            stdin=subprocess.PIPE if self._want_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if self._want_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            bufsize=0,
            close_fds=True,
        )
        if self._want_stdout:
            _grow_pipe(self._proc.stdout.fileno())
        self._stderr_thread = threading.Thread(
            target=self._drain_stderr, name=f"ffmpeg-stderr-{self._proc.pid}", daemon=True
        )
        self._stderr_thread.start()

    def finish(self, timeout: float | None = None) -> None:
        """Close stdin, wait for ffmpeg to exit and reap it; raise `FFmpegError` on a non-zero
        exit, or after killing it if it runs past `timeout` seconds. Idempotent."""
        if self._closed:
            return
        proc = self._require_proc()
        self._close_stdin()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.error(f"timed out after {timeout:g} s") from None
        except BaseException:  # e.g. KeyboardInterrupt while waiting: leave no ffmpeg behind
            self.kill()
            raise
        self._release()
        if proc.returncode != 0:
            raise self.error()
        logger.debug("%s done (%d bytes of stderr)", self.what, self._stderr_total)

    def kill(self) -> None:
        """Kill ffmpeg if it still runs, reap it and close the pipes. Never raises; idempotent."""
        if self._closed or self._proc is None:
            self._closed = True
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._close_stdin()
        self._proc.wait()
        self._release()

    # -- I/O -------------------------------------------------------------------------------

    def write(self, data) -> None:
        """Write all of `data` (any bytes-like object) to ffmpeg's stdin.

        A closed pipe means ffmpeg died or gave up; that becomes `FFmpegError` with its exit
        status and stderr rather than a bare BrokenPipeError.
        """
        stdin = self._require_proc().stdin
        if stdin is None:
            raise RuntimeError(f"{self.what}: started without a stdin pipe")
        view = memoryview(data)
        if view.nbytes == 0:
            return  # and an empty shape can't be cast to bytes
        view = view.cast("B")
        try:
            # A raw pipe write may be partial (a signal, a non-blocking fd); loop until all is in.
            while view:
                written = stdin.write(view)
                view = view[written:]
        except (BrokenPipeError, ConnectionResetError):
            self._wait_dying()
            raise self.error("stopped reading its input") from None

    def readinto(self, buffer) -> int:
        """Fill `buffer` from ffmpeg's stdout; returns the bytes read, fewer than its size only at
        end of stream."""
        stdout = self._require_proc().stdout
        if stdout is None:
            raise RuntimeError(f"{self.what}: started without a stdout pipe")
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            n = stdout.readinto(view[filled:])
            if not n:
                break
            filled += n
        return filled

    def read_all(self) -> bytes:
        """Everything ffmpeg writes to stdout, until it closes it."""
        stdout = self._require_proc().stdout
        if stdout is None:
            raise RuntimeError(f"{self.what}: started without a stdout pipe")
        return stdout.readall()

    # -- state -----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._require_proc().pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def stderr_tail(self) -> str:
        """The last lines ffmpeg wrote to stderr (at most about 2000 characters)."""
        with self._stderr_lock:
            text = bytes(self._stderr_buf[-4 * _TAIL_CHARS :]).decode("utf-8", "replace")
        return text.strip()[-_TAIL_CHARS:]

    @property
    def stderr_bytes(self) -> int:
        """How many bytes ffmpeg has written to stderr in all (kept or not)."""
        return self._stderr_total

    def error(self, reason: str | None = None) -> FFmpegError:
        """An `FFmpegError` for this process: what it was doing, why, and its stderr tail."""
        status = describe_returncode(self.returncode)
        tail = self.stderr_tail
        message = f"ffmpeg failed ({self.what}): {reason + ', ' if reason else ''}{status}"
        if tail:
            message += f": {tail}"
        return FFmpegError(message, returncode=self.returncode, stderr_tail=tail)

    # -- internals -------------------------------------------------------------------------

    def _require_proc(self) -> subprocess.Popen:
        if self._proc is None:
            raise RuntimeError(f"{self.what}: not started")
        return self._proc

    def _drain_stderr(self) -> None:
        stream = self._proc.stderr
        while chunk := stream.read(65536):
            with self._stderr_lock:
                self._stderr_total += len(chunk)
                self._stderr_buf += chunk
                if len(self._stderr_buf) > STDERR_KEEP_BYTES:
                    del self._stderr_buf[: len(self._stderr_buf) - STDERR_KEEP_BYTES]

    def _close_stdin(self) -> None:
        stdin = self._proc.stdin if self._proc is not None else None
        if stdin is not None and not stdin.closed:
            # Nothing is buffered (bufsize=0), so an error here loses nothing.
            with contextlib.suppress(OSError):
                stdin.close()

    def _wait_dying(self) -> None:
        """After a broken pipe ffmpeg is exiting; wait briefly for its status, then force it."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(_DYING_GRACE_S)
        self.kill()

    def _release(self) -> None:
        """After the process has exited: collect the rest of stderr and close our pipe ends."""
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=5)
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()
        self._closed = True


def run_ffmpeg(
    ffmpeg: str, args: list[str], timeout: float | None = None, *, loglevel: str = "error", what: str = "ffmpeg"
) -> None:
    """Run one ffmpeg command to completion (no pipes). Raises `FFmpegError` on a non-zero exit
    or, after killing it, when it runs past `timeout` seconds."""
    with FFmpegPipe(ffmpeg, args, loglevel=loglevel, what=what) as proc:
        proc.finish(timeout)
