"""Avatar cache: a video's per-frame preparation, computed once and reused by every request on it.

An avatar is what the pipeline derives from a source video before any audio is involved: per source
frame (decoded at the request's fps) the face box or None and the 8x32x32 UNet input latent, the
face-parsing blend masks (one per `mask_every` source frames), and the video's facts. The platform
reuses a few template videos with many audios, so this is the common path.

The key (`avatar_key`) is a hash of the video file's CONTENT and of every option that changes the
preparation (`prep_options`), so it is also the avatar's stable public id: a copy of the file under
another path hits, a changed option or a changed byte misses.

`AvatarCache` keeps avatars in two LRU tiers bounded by bytes, memory then disk. On disk an avatar
is one folder `<key>/` holding `meta.json`, `latents.safetensors` (latents, boxes) and `masks.npz`,
written under a temporary name and renamed into place, so a crash never leaves a half avatar where
a reader looks; a folder that does not load is removed and counts as a miss. Everything is guarded
by one lock (file I/O runs outside it), and `get_or_build` builds a key once however many requests
ask for it at the same time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from musetalk_service.pipeline.blend import MaskEntry
from musetalk_service.pipeline.latents import LATENT_SHAPE
from musetalk_service.errors import Cancelled, InputError
from musetalk_service.contract import AVATAR_ID_HEX, FaceBox, LipsyncRequest, is_avatar_id
from musetalk_service.settings import FaceSettings

log = logging.getLogger(__name__)

PREP_VERSION = 2
"""Part of every key: bump it when the face, latent or mask code changes what a preparation gives."""
DISK_FORMAT = 1
"""Written in meta.json; a folder of another format is treated as corrupt (removed, rebuilt)."""
CHUNK = 1 << 20
"""Content hashing reads the file 1 MiB at a time."""
STALE_TEMP_S = 3600.0
"""Temporary folders older than this are leftovers of a crashed writer, removed at start."""

_META, _LATENTS, _MASKS = "meta.json", "latents.safetensors", "masks.npz"


# --- keys -----------------------------------------------------------------------------------------


class _HashMemo:
    """(device, inode, size, mtime_ns, ctime_ns) -> content sha256, LRU, thread-safe."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, ...], str] = OrderedDict()

    def get(self, ident: tuple[int, ...]) -> str | None:
        with self._lock:
            digest = self._entries.get(ident)
            if digest is None:
                self.misses += 1
                return None
            self._entries.move_to_end(ident)
            self.hits += 1
            return digest

    def put(self, ident: tuple[int, ...], digest: str) -> None:
        with self._lock:
            self._entries[ident] = digest
            self._entries.move_to_end(ident)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


_hash_memo = _HashMemo()


def _file_ident(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def content_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) of the file's bytes, streamed 1 MiB at a time; memoised on the file's identity.

    An unchanged file (same device, inode, size, mtime and ctime) is not read again. A file that
    changes while it is read is hashed but not memoised. Raises OSError as `open` does.
    """
    with open(path, "rb", buffering=0) as f:
        before = _file_ident(os.fstat(f.fileno()))
        cached = _hash_memo.get(before)
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])  # hashlib releases the GIL on large updates
        after = _file_ident(os.fstat(f.fileno()))
    hexdigest = digest.hexdigest()
    if after == before:
        _hash_memo.put(before, hexdigest)
    return hexdigest


def weights_fingerprint(models_dir: str | os.PathLike, extra: str = "") -> str:
    """A cheap identity of the weights folder: sha256 of each file's relative path, size and mtime.

    Regenerated or replaced weights change it (and so every avatar key). `extra` is mixed in: pass
    the compute dtype (fp16 on CUDA, fp32 on CPU), which changes latents and masks slightly.
    """
    root = Path(models_dir)
    digest = hashlib.sha256(extra.encode())
    if root.is_dir():
        for p in sorted(q for q in root.rglob("*") if q.is_file()):
            st = p.stat()
            digest.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def prep_options(
    request: LipsyncRequest,
    fps: Fraction,
    face: FaceSettings,
    weights_id: str,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """The options that change a preparation, canonical and JSON-able; feed it to `avatar_key`.

    `fps`: the RESOLVED source rate (the request's fps, else the video's), so "unset" and "the
    video's own rate" share an avatar. Options that do not matter are left out, so they do not split
    the cache: with a `face_box` nothing about detection (it is used as given), and the cheek widths
    only in `jaw` mode. `batch_size` (default the request's): face tracking places keyframes per
    batch, so the boxes depend on it; a runner that prepares with a fixed batch passes that.
    """
    options: dict[str, Any] = {
        "fps": Fraction(fps),
        "face_box": request.face_box,
        "parsing_mode": request.parsing_mode,
        "mask_every": request.mask_every,
        "weights": weights_id,
    }
    if request.parsing_mode == "jaw":
        options["left_cheek_width"] = request.left_cheek_width
        options["right_cheek_width"] = request.right_cheek_width
    if request.face_box is None:
        options["bbox_shift"] = request.bbox_shift
        options["extra_margin"] = request.extra_margin
        options["detector"] = face.model_dump()
        options["batch_size"] = batch_size if batch_size is not None else request.batch_size
    return _canonical(options)


def _canonical(value: Any) -> Any:
    """JSON-able, order-independent form: Fraction -> "n/d" (or an int), integral floats -> int,
    tuples -> lists, dict keys sorted; anything else (paths!) is refused."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if hasattr(value, "model_dump"):  # pydantic models (settings sections)
        return _canonical(value.model_dump())
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, Fraction):
        return value.numerator if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return int(f) if f.is_integer() else f
    raise TypeError(f"option value {value!r} ({type(value).__name__}) cannot be part of an avatar key")


def avatar_key(video_path: str | os.PathLike, options: Mapping[str, Any]) -> str:
    """The avatar's id: 32 hex digits of sha256(content hash of the video, canonical options)."""
    text = json.dumps(_canonical(options), sort_keys=True, separators=(",", ":"))
    payload = f"musetalk-avatar\n{PREP_VERSION}\n{content_hash(video_path)}\n{text}"
    return hashlib.sha256(payload.encode()).hexdigest()[:AVATAR_ID_HEX]


# --- the avatar -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Avatar:
    """A prepared video. Read-only by contract: requests share one instance (masks are read-only).

    `latents`: `[frame_count, 8, 32, 32]` fp16 on the CPU (masked + reference latents), zeros
    where `boxes[j]` is None; the runner moves it to the device once per request. `masks`: keyed by
    `j - j % mask_every`, only for keys with a face. `bytes` is computed (the memory estimate).
    """

    key: str
    frame_count: int
    fps: Fraction
    width: int
    height: int
    boxes: tuple[FaceBox | None, ...]
    latents: torch.Tensor
    masks: Mapping[int, MaskEntry]
    options: Mapping[str, Any] = field(default_factory=dict)
    video: str = ""
    """The file name it was built from (informational; the key is content-based)."""
    created_at: float = field(default_factory=time.time)
    bytes: int = field(init=False)

    def __post_init__(self) -> None:
        if not is_avatar_id(self.key):
            raise ValueError(f"not an avatar key: {self.key!r}")
        n = int(self.frame_count)
        boxes = tuple(None if b is None else tuple(int(v) for v in b) for b in self.boxes)
        if len(boxes) != n or any(b is not None and len(b) != 4 for b in boxes):
            raise ValueError(f"{len(boxes)} boxes for {n} frames")
        latents = self.latents.detach().to("cpu", torch.float16).contiguous()
        if tuple(latents.shape) != (n, *LATENT_SHAPE):
            raise ValueError(f"latents {tuple(latents.shape)}, expected {(n, *LATENT_SHAPE)}")
        masks: dict[int, MaskEntry] = {}
        for k, (values, top, left, side) in sorted(self.masks.items()):
            values = np.ascontiguousarray(values, dtype=np.uint8)
            if values.ndim != 2:
                raise ValueError(f"mask {k}: values must be 2-D, got {values.shape}")
            values.setflags(write=False)
            masks[int(k)] = (values, int(top), int(left), int(side))
        set_ = object.__setattr__
        set_(self, "frame_count", n)
        set_(self, "fps", Fraction(self.fps))
        set_(self, "width", int(self.width))
        set_(self, "height", int(self.height))
        set_(self, "boxes", boxes)
        set_(self, "latents", latents)
        set_(self, "masks", masks)
        set_(self, "options", _canonical(dict(self.options)))
        mask_bytes = sum(v.nbytes for v, *_ in masks.values())
        set_(self, "bytes", latents.numel() * latents.element_size() + mask_bytes + 64 * (n + len(masks)) + 1024)

    @property
    def faces(self) -> int:
        """Frames with a face box."""
        return sum(b is not None for b in self.boxes)

    def summary(self) -> dict[str, Any]:
        """JSON-able facts (what `AvatarCache.list` returns per avatar, with its tiers)."""
        return {
            "key": self.key,
            "video": self.video,
            "frame_count": self.frame_count,
            "fps": f"{self.fps.numerator}/{self.fps.denominator}",
            "width": self.width,
            "height": self.height,
            "faces": self.faces,
            "masks": len(self.masks),
            "created_at": self.created_at,
            "bytes": self.bytes,
            "options": dict(self.options),
        }


# --- disk format ----------------------------------------------------------------------------------


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_folder(avatar: Avatar, folder: Path) -> None:
    """The three files into `folder` (which must exist); meta.json last."""
    boxes = torch.tensor([b if b is not None else (0, 0, 0, 0) for b in avatar.boxes], dtype=torch.int32).reshape(-1, 4)
    has_face = torch.tensor([b is not None for b in avatar.boxes], dtype=torch.uint8)
    tensors = {"latents": avatar.latents, "boxes": boxes.contiguous(), "has_face": has_face}
    _fsync_write(folder / _LATENTS, save_safetensors(tensors, metadata={"key": avatar.key}))

    index = np.array(
        [(k, top, left, side, *values.shape) for k, (values, top, left, side) in avatar.masks.items()], dtype=np.int64
    ).reshape(-1, 6)
    flat = np.concatenate([v.ravel() for v, *_ in avatar.masks.values()]) if avatar.masks else np.zeros(0, np.uint8)
    with open(folder / _MASKS, "wb") as f:
        np.savez_compressed(f, index=index, values=flat)
        f.flush()
        os.fsync(f.fileno())

    meta = {"format": DISK_FORMAT, **avatar.summary()}
    _fsync_write(folder / _META, json.dumps(meta, indent=1).encode())


def _read_meta(folder: Path, key: str) -> dict[str, Any]:
    meta = json.loads((folder / _META).read_text())
    if meta.get("format") != DISK_FORMAT or meta.get("key") != key:
        raise ValueError(f"meta.json of format {meta.get('format')!r}, key {meta.get('key')!r}")
    return meta


def _read_folder(folder: Path, key: str) -> Avatar:
    """The avatar in `folder`; raises on anything missing, short or inconsistent."""
    meta = _read_meta(folder, key)
    tensors = load_safetensors((folder / _LATENTS).read_bytes())
    has_face = tensors["has_face"].tolist()
    boxes = tuple(tuple(b) if f else None for b, f in zip(tensors["boxes"].tolist(), has_face))
    with np.load(folder / _MASKS, allow_pickle=False) as npz:
        index, flat = npz["index"], npz["values"]
    if index.ndim != 2 or index.shape[1] != 6 or flat.dtype != np.uint8:
        raise ValueError("masks.npz: bad index or values")
    sizes = index[:, 4] * index[:, 5]
    if int(sizes.sum()) != flat.size:
        raise ValueError(f"masks.npz: {flat.size} values for {int(sizes.sum())} expected")
    masks: dict[int, MaskEntry] = {}
    offset = 0
    for (k, top, left, side, h, w), size in zip(index.tolist(), sizes.tolist()):
        masks[k] = (flat[offset : offset + size].reshape(h, w), top, left, side)
        offset += size
    fps_n, fps_d = (int(v) for v in meta["fps"].split("/"))
    return Avatar(
        key=key,
        frame_count=meta["frame_count"],
        fps=Fraction(fps_n, fps_d),
        width=meta["width"],
        height=meta["height"],
        boxes=boxes,
        latents=tensors["latents"],
        masks=masks,
        options=meta.get("options", {}),
        video=meta.get("video", ""),
        created_at=meta.get("created_at", 0.0),
    )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# --- the cache ------------------------------------------------------------------------------------


@dataclass
class _DiskEntry:
    bytes: int
    summary: dict[str, Any]
    last_used: float


class _Build:
    """One build in progress: waiters block on `done`, then read `avatar` or `error`."""

    def __init__(self, generation: int):
        self.generation = generation
        self.done = threading.Event()
        self.avatar: Avatar | None = None
        self.error: BaseException | None = None


class AvatarCache:
    """Avatars by key in memory and on disk, each tier an LRU bounded by bytes; thread-safe.

    `dir=None` keeps no disk tier; `max_memory_bytes=0` no memory tier. An avatar larger than a
    tier's bound is not kept in that tier. One process should own a folder (the byte accounting is
    per process); readers in other processes are safe, since folders appear and vanish by rename.
    `share_errors`: a build failing with one of these (input errors: the same video would fail
    again) fails its waiters too; any other failure (cancelled, out of memory) makes a waiter build.
    """

    def __init__(
        self,
        dir: Path | None,
        *,
        max_memory_bytes: int,
        max_disk_bytes: int,
        share_errors: tuple[type[BaseException], ...] = (InputError,),
    ):
        self.dir = Path(dir) if dir is not None else None
        self.max_memory_bytes = int(max_memory_bytes)
        self.max_disk_bytes = int(max_disk_bytes) if self.dir is not None else 0
        self.share_errors = share_errors
        self._lock = threading.Lock()
        self._disk_lock = threading.Lock()
        """Serialises disk writes with deletes; taken before `_lock`, never inside it."""
        self._memory: OrderedDict[str, Avatar] = OrderedDict()
        self._memory_bytes = 0
        self._memory_used: dict[str, float] = {}
        self._disk: OrderedDict[str, _DiskEntry] = OrderedDict()
        self._disk_bytes = 0
        self._building: dict[str, _Build] = {}
        self._generation: dict[str, int] = {}
        """Bumped by `delete`: a build or write that started before it does not bring the key back."""
        self._counts = dict.fromkeys(
            ("hits", "memory_hits", "disk_hits", "misses", "builds", "build_failures", "waits",
             "memory_evictions", "disk_evictions", "corrupt", "disk_errors"), 0
        )
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._scan()

    # public API

    def get(self, key: str) -> Avatar | None:
        """The avatar, from memory, else from disk (then kept in memory); counts a hit or a miss."""
        avatar = self._lookup(key)
        with self._lock:
            self._counts["hits" if avatar is not None else "misses"] += 1
        return avatar

    def put(self, avatar: Avatar) -> None:
        """Keep `avatar` in memory and write it to disk, evicting least recently used ones."""
        with self._lock:
            generation = self._generation.get(avatar.key, 0)
        self._store(avatar, generation)

    def get_or_build(
        self, key: str, build: Callable[[], Avatar], cancel: threading.Event | None = None
    ) -> Avatar:
        """The cached avatar, else `build()`'s, cached. Concurrent callers for a key under
        construction wait for it (a hit each) instead of building it again. `cancel` set while
        waiting raises `Cancelled`. The avatar's key must be `key`."""
        if not is_avatar_id(key):
            raise ValueError(f"not an avatar key: {key!r}")
        while True:
            avatar = self._lookup(key)
            with self._lock:
                if avatar is None:
                    avatar = self._memory.get(key)  # built between the lookup and this lock
                if avatar is not None:
                    self._counts["hits"] += 1
                    return avatar
                job = self._building.get(key)
                mine = job is None
                if mine:
                    job = self._building[key] = _Build(self._generation.get(key, 0))
            if mine:
                return self._build(key, build, job)
            self._wait(job, cancel)
            with self._lock:
                if job.avatar is not None:
                    self._counts["hits"] += 1
                    self._counts["waits"] += 1
                    return job.avatar
                if isinstance(job.error, self.share_errors):
                    self._counts["misses"] += 1
                    raise job.error
            # The build failed for a reason of its own: try again (one waiter becomes the builder).

    def delete(self, key: str) -> bool:
        """Forget the avatar in both tiers (a build in progress is not cached); whether it existed."""
        if not is_avatar_id(key):
            return False
        with self._disk_lock, self._lock:
            self._generation[key] = self._generation.get(key, 0) + 1
            found = self._drop_memory(key)
            found = self._drop_disk_entry(key) or found
            trash = self._retire_folder(key)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
            found = True
        return found

    def list(self) -> list[dict[str, Any]]:
        """A summary per avatar (most recently used first), with `in_memory`, `on_disk`, `last_used`."""
        with self._lock:
            rows: dict[str, dict[str, Any]] = {}
            for key, entry in self._disk.items():
                rows[key] = {**entry.summary, "in_memory": False, "on_disk": True, "disk_bytes": entry.bytes,
                             "last_used": entry.last_used}
            for key, avatar in self._memory.items():
                row = rows.setdefault(key, {**avatar.summary(), "on_disk": False, "last_used": 0.0})
                row["in_memory"] = True
                row["last_used"] = max(row["last_used"], self._memory_used.get(key, 0.0))
            return sorted(rows.values(), key=lambda r: r["last_used"], reverse=True)

    def list_shared(self) -> list[dict[str, Any]]:
        """`list()` plus the avatars other processes wrote to the folder since this one indexed it
        (engine replicas sharing one cache folder), as disk entries; unreadable folders are skipped."""
        rows = self.list()
        if self.dir is None:
            return rows
        known = {row["key"] for row in rows}
        for path in self.dir.iterdir():
            if path.name in known or not is_avatar_id(path.name):
                continue
            try:
                meta = _read_meta(path, path.name)
                stat = path.stat()
                size = _folder_bytes(path)
            except (OSError, ValueError):  # half-written, or removed while listing
                continue
            meta.pop("format", None)
            rows.append({**meta, "in_memory": False, "on_disk": True, "disk_bytes": size, "last_used": stat.st_mtime})
        return sorted(rows, key=lambda r: r["last_used"], reverse=True)

    def stats(self) -> dict[str, int]:
        """Counters (hits, misses, builds, waits, evictions, corrupt folders...) and tier sizes."""
        with self._lock:
            return {
                **self._counts,
                "entries": len(self._memory.keys() | self._disk.keys()),
                "memory_entries": len(self._memory),
                "memory_bytes": self._memory_bytes,
                "max_memory_bytes": self.max_memory_bytes,
                "disk_entries": len(self._disk),
                "disk_bytes": self._disk_bytes,
                "max_disk_bytes": self.max_disk_bytes,
                "building": len(self._building),
            }

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._memory or key in self._disk

    # lookups and builds

    def _lookup(self, key: str) -> Avatar | None:
        """Memory, then disk (promoted to memory); counts only the tier hit and corrupt folders."""
        if not is_avatar_id(key):
            return None
        with self._lock:
            avatar = self._memory.get(key)
            if avatar is not None:
                self._memory.move_to_end(key)
                self._memory_used[key] = time.time()
                self._counts["memory_hits"] += 1
                touch = self._touch_disk(key)
            elif self.dir is None:
                return None
            generation = self._generation.get(key, 0)
        if avatar is not None:
            if touch:
                _utime(self.dir / key)
            return avatar
        folder = self.dir / key
        try:
            inode = folder.stat().st_ino  # also finds a folder another process wrote
        except OSError:
            return None
        try:
            avatar = _read_folder(folder, key)
        except Exception as exc:  # noqa: BLE001 - any unreadable folder is a miss, then removed
            self._discard_corrupt(key, inode, exc)
            return None
        _utime(folder)
        with self._lock:
            self._counts["disk_hits"] += 1
            if self._generation.get(key, 0) != generation:
                return avatar  # deleted while we read it: hand it out, keep nothing
            if key not in self._disk:
                self._add_disk_entry(key, _folder_bytes_safe(folder), avatar.summary())
            self._touch_disk(key)
            self._add_memory(avatar)
            trash = self._evict_disk()
        _remove_all(trash)
        return avatar

    def _build(self, key: str, build: Callable[[], Avatar], job: _Build) -> Avatar:
        try:
            avatar = build()
            if not isinstance(avatar, Avatar) or avatar.key != key:
                raise ValueError(f"the build of avatar {key} returned {getattr(avatar, 'key', avatar)!r}")
        except BaseException as exc:
            with self._lock:
                self._counts["misses"] += 1
                self._counts["build_failures"] += 1
                job.error = exc
                del self._building[key]
            job.done.set()
            raise
        with self._lock:
            self._counts["misses"] += 1
            self._counts["builds"] += 1
            job.avatar = avatar
        job.done.set()  # waiters go on with it while it is written to disk
        try:
            self._store(avatar, job.generation)
        finally:
            with self._lock:
                del self._building[key]
        return avatar

    def _wait(self, job: _Build, cancel: threading.Event | None) -> None:
        while not job.done.wait(0.1):
            if cancel is not None and cancel.is_set():
                raise Cancelled("the job was cancelled")

    # storing

    def _store(self, avatar: Avatar, generation: int) -> None:
        key = avatar.key
        with self._lock:
            if self._generation.get(key, 0) != generation:
                return  # deleted meanwhile
            self._add_memory(avatar)
            if self.dir is None or avatar.bytes > self.max_disk_bytes or key in self._disk:
                self._touch_disk(key)
                return
        # Disk writes and deletes take turns (a write is rare and short): a delete between our
        # rename and our index update could otherwise retire another writer's folder.
        with self._disk_lock:
            self._write_to_disk(avatar, generation)

    def _write_to_disk(self, avatar: Avatar, generation: int) -> None:
        key = avatar.key
        with self._lock:
            if self._generation.get(key, 0) != generation or key in self._disk:
                return  # deleted, or written by another caller, while we waited
        folder = self.dir / key
        temp = self.dir / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        try:
            temp.mkdir()
            _write_folder(avatar, temp)
            size = _folder_bytes(temp)
            _rename_into_place(temp, folder)
            _fsync_dir(self.dir)
        except Exception as exc:  # noqa: BLE001 - the disk tier is best effort (full disk, ...)
            shutil.rmtree(temp, ignore_errors=True)
            log.warning("avatar %s not written to disk: %s", key, exc)
            with self._lock:
                self._counts["disk_errors"] += 1
            return
        with self._lock:
            if self._generation.get(key, 0) != generation:
                trash = [self._retire_folder(key)]  # deleted while it was being written
                self._drop_memory(key)
            else:
                if key not in self._disk:
                    self._add_disk_entry(key, size, avatar.summary())
                trash = self._evict_disk()
        _remove_all(trash)

    def _add_memory(self, avatar: Avatar) -> None:
        """(lock held) Insert or refresh, then evict down to the bound."""
        if avatar.bytes > self.max_memory_bytes:
            return
        old = self._memory.pop(avatar.key, None)
        if old is not None:
            self._memory_bytes -= old.bytes
        self._memory[avatar.key] = avatar
        self._memory_bytes += avatar.bytes
        self._memory_used[avatar.key] = time.time()
        while self._memory_bytes > self.max_memory_bytes and len(self._memory) > 1:
            victim_key, victim = self._memory.popitem(last=False)
            self._memory_bytes -= victim.bytes
            self._memory_used.pop(victim_key, None)
            self._counts["memory_evictions"] += 1

    def _drop_memory(self, key: str) -> bool:
        avatar = self._memory.pop(key, None)
        if avatar is not None:
            self._memory_bytes -= avatar.bytes
            self._memory_used.pop(key, None)
        return avatar is not None

    # disk index (every method here: lock held, no file I/O but renames)

    def _add_disk_entry(self, key: str, size: int, summary: dict[str, Any]) -> None:
        self._disk[key] = _DiskEntry(size, summary, time.time())
        self._disk_bytes += size

    def _drop_disk_entry(self, key: str) -> bool:
        entry = self._disk.pop(key, None)
        if entry is not None:
            self._disk_bytes -= entry.bytes
        return entry is not None

    def _touch_disk(self, key: str) -> bool:
        entry = self._disk.get(key)
        if entry is None:
            return False
        entry.last_used = time.time()
        self._disk.move_to_end(key)
        return True

    def _evict_disk(self) -> list[Path]:
        """Folders of the least recently used avatars moved aside until the tier fits; delete them
        (outside the lock) with `_remove_all`."""
        trash = []
        while self._disk_bytes > self.max_disk_bytes and self._disk:
            key, entry = self._disk.popitem(last=False)
            self._disk_bytes -= entry.bytes
            self._counts["disk_evictions"] += 1
            trash.append(self._retire_folder(key))
        return [t for t in trash if t is not None]

    def _retire_folder(self, key: str) -> Path | None:
        """Rename the key's folder aside (atomic: readers see it whole or not at all)."""
        if self.dir is None:
            return None
        trash = self.dir / f".trash-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.dir / key, trash)
        except OSError:
            return None
        return trash

    def _discard_corrupt(self, key: str, inode: int, exc: BaseException) -> None:
        with self._lock:
            trash = None
            try:
                same = (self.dir / key).stat().st_ino == inode  # not one written since we read
            except OSError:
                same = False  # deleted or evicted while we read: not corrupt
            if same:
                self._counts["corrupt"] += 1
                self._drop_disk_entry(key)
                trash = self._retire_folder(key)
        if same:
            log.warning("avatar folder %s is unreadable (%s: %s); removed", key, type(exc).__name__, exc)
        _remove_all([trash])

    def _scan(self) -> None:
        """Index the folder at start: valid avatars by last use; half or stale folders removed."""
        assert self.dir is not None
        found = []
        now = time.time()
        for path in self.dir.iterdir():
            name = path.name
            try:
                if name.startswith(".trash-") or (name.startswith(".tmp-") and now - path.stat().st_mtime > STALE_TEMP_S):
                    shutil.rmtree(path, ignore_errors=True)
                    continue
                if not path.is_dir() or not is_avatar_id(name):
                    continue
                meta = _read_meta(path, name)
                meta.pop("format", None)
                found.append((path.stat().st_mtime, name, _folder_bytes(path), meta))
            except Exception as exc:  # noqa: BLE001 - a half or foreign folder is not an avatar
                log.warning("removing unreadable avatar folder %s (%s)", path, exc)
                self._counts["corrupt"] += 1
                shutil.rmtree(path, ignore_errors=True)
        for mtime, key, size, meta in sorted(found):
            self._disk[key] = _DiskEntry(size, meta, mtime)
            self._disk_bytes += size
        _remove_all(self._evict_disk())


def _rename_into_place(temp: Path, folder: Path) -> None:
    """Rename `temp` to `folder`; an existing folder (the same key written meanwhile) is kept."""
    try:
        os.rename(temp, folder)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        shutil.rmtree(temp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _utime(path: Path) -> None:
    """Mark a folder used now: its mtime orders the disk LRU across restarts."""
    try:
        os.utime(path)
    except OSError:
        pass


def _folder_bytes_safe(folder: Path) -> int:
    try:
        return _folder_bytes(folder)
    except OSError:
        return 0


def _remove_all(paths: Sequence[Path | None]) -> None:
    for path in paths:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
