"""Work folders that a process holds while it lives, so that the next server can remove those of a dead one.

A job's work folder (`musetalk-work-<hex>` under the work root: the AAC track, the silent video,
segments) is removed when the job ends; a process killed with SIGKILL (or by the OOM killer)
leaves it behind. Each such folder is therefore held: its creator keeps it open with an
exclusive `flock` until `remove`, and the kernel drops that lock when the process dies,
however it dies. `sweep` (at server start) removes every such folder whose lock it can take:
nobody holds it, so its process is gone. A live process's folder is never touched: its lock is
busy, even for another server sharing the work root.

A folder is created under a staging name, locked, then renamed: under its final name it is
always locked. Only names made here are swept (not `musetalk-demo-*` of the demo command, nor
the avatar videos folder, nor folders of older versions). Where `flock` is not supported
(some network file systems) folders are made unlocked and `sweep` leaves them alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

WORK_PREFIX = "musetalk-work-"
_STAGING_PREFIX = ".musetalk-new-"
_SWEPT = re.compile(rf"^(?:{re.escape(WORK_PREFIX)}[0-9a-f]{{32}}|{re.escape(_STAGING_PREFIX)}\w+)$")

_held: dict[str, int] = {}
"""Folder path -> the descriptor holding its lock."""
_held_lock = threading.Lock()


def make(root: Path) -> Path:
    """A new work folder under `root`, held by this process until `remove`."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{WORK_PREFIX}{uuid.uuid4().hex}"
    while True:
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
        try:
            fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue  # a starting server swept it before it was locked: make another
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a starting server is sweeping it: make another
            continue
        except OSError:
            pass  # no flock here: an unlocked folder, which `sweep` never removes
        try:
            os.rename(staging, folder)
        except FileNotFoundError:
            os.close(fd)  # swept before it was locked: make another
            continue
        except BaseException:
            os.close(fd)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with _held_lock:
            _held[str(folder)] = fd
        return folder


def remove(folder: Path) -> None:
    """Remove a folder from `make`, then let go of its lock."""
    shutil.rmtree(folder, ignore_errors=True)
    with _held_lock:
        fd = _held.pop(str(folder), None)
    if fd is not None:
        os.close(fd)


def sweep(root: Path) -> list[Path]:
    """Remove the work folders under `root` that no live process holds; the folders removed."""
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not _SWEPT.match(entry.name):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or not a folder
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held by a live process (or no flock here): not ours to remove
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d work folder(s) left by processes that died: %s", len(removed), ", ".join(p.name for p in removed))
    return removed
