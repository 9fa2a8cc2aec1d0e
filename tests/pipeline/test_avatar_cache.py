"""Avatar cache: content keys, the two LRU tiers, the disk format, concurrency and counters."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk_service.errors import Cancelled, NoFace
from musetalk_service.pipeline import avatar_cache
from musetalk_service.pipeline.avatar_cache import (
    Avatar,
    AvatarCache,
    avatar_key,
    content_hash,
    prep_options,
    weights_fingerprint,
)
from musetalk_service.contract import LipsyncRequest, is_avatar_id
from musetalk_service.settings import FaceSettings

MB = 1 << 20


def _request(**options) -> LipsyncRequest:
    return LipsyncRequest(video_path=Path("v.mp4"), audio_path=Path("a.wav"), output_path=Path("o.mp4"), **options)


def _options(**overrides) -> dict:
    face = overrides.pop("face", FaceSettings())
    fps = overrides.pop("fps", Fraction(25))
    weights = overrides.pop("weights", "w1")
    return prep_options(_request(**overrides), fps, face, weights)


def _key(n: int) -> str:
    return f"{n:032x}"


def _avatar(key: str | int = 1, frames: int = 12, seed: int = 0, mask_every: int = 5, mask_side: int = 40) -> Avatar:
    rng = np.random.default_rng(seed)
    boxes = [None if j % 4 == 3 else (10 + j, 20, 90 + j, 110) for j in range(frames)]
    latents = torch.from_numpy(rng.standard_normal((frames, 8, 32, 32)).astype(np.float32))
    latents[[j for j, b in enumerate(boxes) if b is None]] = 0
    masks = {
        k: (rng.integers(0, 256, (mask_side // 2 + k % 3, mask_side - 3), dtype=np.uint8), mask_side // 2, 2, mask_side)
        for k in range(0, frames, mask_every)
    }
    masks[0] = (np.zeros((0, 0), np.uint8), 0, 0, mask_side)  # an empty mask survives too
    return Avatar(
        key=_key(key) if isinstance(key, int) else key,
        frame_count=frames,
        fps=Fraction(30000, 1001),
        width=320,
        height=240,
        boxes=boxes,
        latents=latents,
        masks=masks,
        options={"fps": "30000/1001", "mask_every": mask_every},
        video="template.mp4",
    )


def _assert_same(a: Avatar, b: Avatar) -> None:
    assert (a.key, a.frame_count, a.fps, a.width, a.height, a.video) == (b.key, b.frame_count, b.fps, b.width, b.height, b.video)
    assert a.boxes == b.boxes
    assert b.latents.dtype == torch.float16 and b.latents.device.type == "cpu"
    assert torch.equal(a.latents, b.latents)
    assert a.masks.keys() == b.masks.keys()
    for k in a.masks:
        (va, *ra), (vb, *rb) = a.masks[k], b.masks[k]
        assert ra == rb and va.dtype == vb.dtype == np.uint8 and np.array_equal(va, vb)
    assert dict(a.options) == dict(b.options)
    assert a.created_at == pytest.approx(b.created_at)


@pytest.fixture
def video(tmp_path) -> Path:
    path = tmp_path / "clip.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3 * MB + 123, dtype=np.uint8).tobytes())
    return path


# --- keys ---------------------------------------------------------------------------------------


def test_content_hash_is_sha256_of_the_bytes_and_memoised(video):
    import hashlib

    avatar_cache._hash_memo.clear()
    assert content_hash(video) == hashlib.sha256(video.read_bytes()).hexdigest()
    assert (avatar_cache._hash_memo.hits, avatar_cache._hash_memo.misses) == (0, 1)
    content_hash(video)
    assert avatar_cache._hash_memo.hits == 1
    # Same size, new content: the file's identity (mtime/ctime) changed, so it is read again.
    data = bytearray(video.read_bytes())
    data[5] ^= 0xFF
    video.write_bytes(bytes(data))
    st = video.stat()
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert content_hash(video) == hashlib.sha256(bytes(data)).hexdigest()


def test_key_follows_content_not_path(video, tmp_path):
    options = _options()
    key = avatar_key(video, options)
    assert is_avatar_id(key) and len(key) == 32
    copy = tmp_path / "elsewhere" / "renamed.mov"
    copy.parent.mkdir()
    shutil.copy(video, copy)
    assert avatar_key(copy, options) == key
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    assert avatar_key(copy, options) != key


@pytest.mark.parametrize(
    "change",
    [
        {"fps": Fraction(30000, 1001)},
        {"face_box": (10, 20, 110, 140)},
        {"bbox_shift": 5},
        {"extra_margin": 20},
        {"parsing_mode": "neck"},
        {"left_cheek_width": 80},
        {"right_cheek_width": 100},
        {"mask_every": 1},
        {"weights": "w2"},
        {"face": FaceSettings(detector="haar")},
        {"face": FaceSettings(detect_every=3)},
        {"face": FaceSettings(smoothing={"enabled": False})},
        {"batch_size": 8},
    ],
)
def test_key_changes_with_each_prep_option(video, change):
    assert avatar_key(video, _options(**change)) != avatar_key(video, _options())


def test_options_that_do_not_change_the_prep_share_a_key(video):
    box = (10, 20, 110, 140)
    with_box = avatar_key(video, _options(face_box=box))
    # A given face box is used as is: detector, bbox_shift, extra_margin and batch size are moot.
    assert avatar_key(video, _options(face_box=box, bbox_shift=7, extra_margin=0, batch_size=4,
                                      face=FaceSettings(detector="haar"))) == with_box
    # Cheek widths only shape the jaw mode's mask.
    assert avatar_key(video, _options(parsing_mode="raw", left_cheek_width=10)) == avatar_key(video, _options(parsing_mode="raw"))
    # 25.0 and Fraction(25) are one rate; option order is irrelevant.
    assert avatar_key(video, {"fps": 25.0, "a": 1}) == avatar_key(video, {"a": 1, "fps": Fraction(25)})
    with pytest.raises(TypeError):
        avatar_key(video, {"path": Path("x")})


def test_weights_fingerprint_changes_with_the_files(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "w.bin").write_bytes(b"a" * 10)
    first = weights_fingerprint(tmp_path, "float16")
    assert weights_fingerprint(tmp_path, "float16") == first
    assert weights_fingerprint(tmp_path, "float32") != first
    (tmp_path / "vae" / "w.bin").write_bytes(b"b" * 11)
    assert weights_fingerprint(tmp_path, "float16") != first


# --- the avatar ---------------------------------------------------------------------------------


def test_avatar_normalises_and_validates():
    a = _avatar()
    assert a.latents.dtype == torch.float16 and a.faces == 9 and len(a.masks) == 3
    assert a.bytes > a.latents.numel() * 2
    assert not a.masks[5][0].flags.writeable
    with pytest.raises(ValueError):
        Avatar(key=_key(1), frame_count=3, fps=25, width=8, height=8, boxes=[None] * 2,
               latents=torch.zeros(3, 8, 32, 32), masks={})
    with pytest.raises(ValueError):
        Avatar(key="../etc", frame_count=1, fps=25, width=8, height=8, boxes=[None],
               latents=torch.zeros(1, 8, 32, 32), masks={})
    summary = a.summary()
    json.dumps(summary)
    assert summary["fps"] == "30000/1001" and summary["frame_count"] == 12


# --- tiers --------------------------------------------------------------------------------------


def test_round_trip_memory_and_disk(tmp_path):
    cache = AvatarCache(tmp_path, max_memory_bytes=100 * MB, max_disk_bytes=100 * MB)
    a = _avatar()
    cache.put(a)
    assert cache.get(a.key) is a
    folder = tmp_path / a.key
    assert sorted(p.name for p in folder.iterdir()) == ["latents.safetensors", "masks.npz", "meta.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    fresh = AvatarCache(tmp_path, max_memory_bytes=100 * MB, max_disk_bytes=100 * MB)
    assert fresh.stats()["disk_entries"] == 1 and fresh.stats()["memory_entries"] == 0
    b = fresh.get(a.key)
    _assert_same(a, b)
    assert fresh.get(a.key) is b  # promoted to memory
    s = fresh.stats()
    assert (s["hits"], s["disk_hits"], s["memory_hits"], s["misses"]) == (2, 1, 1, 0)
    [row] = fresh.list()
    assert row["key"] == a.key and row["in_memory"] and row["on_disk"] and row["frame_count"] == 12


def test_memory_lru_by_bytes():
    size = _avatar().bytes
    cache = AvatarCache(None, max_memory_bytes=int(2.5 * size), max_disk_bytes=0)
    for n in (1, 2):
        cache.put(_avatar(n))
    cache.get(_key(1))  # 1 is now more recent than 2
    cache.put(_avatar(3))
    assert _key(1) in cache and _key(3) in cache and _key(2) not in cache
    s = cache.stats()
    assert s["memory_entries"] == 2 and s["memory_bytes"] == 2 * size and s["memory_evictions"] == 1
    cache.put(_avatar(4, frames=200))  # larger than the whole tier: not kept
    assert _key(4) not in cache and cache.stats()["memory_entries"] == 2


def test_disk_lru_by_bytes(tmp_path):
    probe = AvatarCache(tmp_path / "probe", max_memory_bytes=0, max_disk_bytes=100 * MB)
    probe.put(_avatar(9))
    size = probe.stats()["disk_bytes"]
    assert 0 < size < _avatar().bytes  # masks compressed

    cache = AvatarCache(tmp_path / "c", max_memory_bytes=0, max_disk_bytes=int(2.5 * size))
    for n in (1, 2):
        cache.put(_avatar(n))
    assert cache.get(_key(1)) is not None
    cache.put(_avatar(3))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [_key(1), _key(3)]
    s = cache.stats()
    assert s["disk_entries"] == 2 and s["disk_evictions"] == 1 and s["disk_bytes"] <= 2.5 * size
    assert cache.get(_key(2)) is None

    # The order survives a restart (folder mtimes), and a smaller bound evicts at start.
    os.utime(tmp_path / "c" / _key(1), (time.time() - 100, time.time() - 100))
    smaller = AvatarCache(tmp_path / "c", max_memory_bytes=0, max_disk_bytes=int(1.5 * size))
    assert [r["key"] for r in smaller.list()] == [_key(3)]


def test_corrupt_and_half_folders_are_ignored_and_removed(tmp_path):
    cache = AvatarCache(tmp_path, max_memory_bytes=0, max_disk_bytes=100 * MB)
    for n in (1, 2, 3):
        cache.put(_avatar(n))
    (tmp_path / _key(1) / "latents.safetensors").write_bytes(b"not a safetensors file")  # corrupt
    (tmp_path / _key(2) / "meta.json").unlink()  # half
    half = tmp_path / _key(4)
    half.mkdir()
    (half / "latents.safetensors").write_bytes(b"")
    stale = tmp_path / f".tmp-{_key(5)}-0000"
    stale.mkdir()
    os.utime(stale, (0, 0))
    live_temp = tmp_path / f".tmp-{_key(6)}-0000"  # another writer's, just started: kept
    live_temp.mkdir()

    # In the running cache: the corrupt folder is a miss and is removed.
    assert cache.get(_key(1)) is None
    assert not (tmp_path / _key(1)).exists()
    s = cache.stats()
    assert s["misses"] == 1 and s["corrupt"] == 1

    # At start: half folders and stale temp folders are removed, good ones kept.
    fresh = AvatarCache(tmp_path, max_memory_bytes=0, max_disk_bytes=100 * MB)
    assert [r["key"] for r in fresh.list()] == [_key(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([_key(3), live_temp.name])
    _assert_same(_avatar(3), fresh.get(_key(3)))


def test_delete_removes_both_tiers(tmp_path):
    cache = AvatarCache(tmp_path, max_memory_bytes=100 * MB, max_disk_bytes=100 * MB)
    a = _avatar()
    cache.put(a)
    assert cache.delete(a.key) is True
    assert not (tmp_path / a.key).exists() and a.key not in cache
    assert cache.get(a.key) is None and cache.list() == []
    assert cache.delete(a.key) is False
    assert cache.delete("../../etc") is False  # ids never name other paths
    assert cache.get("../x") is None
    s = cache.stats()
    assert (s["entries"], s["memory_bytes"], s["disk_bytes"]) == (0, 0, 0)


def test_stats_count_hits_and_misses(tmp_path):
    cache = AvatarCache(tmp_path, max_memory_bytes=100 * MB, max_disk_bytes=100 * MB)
    assert cache.get(_key(1)) is None
    cache.put(_avatar(1))
    cache.get(_key(1))
    cache.get(_key(1))
    cache.get(_key(2))
    s = cache.stats()
    assert (s["hits"], s["misses"], s["entries"]) == (2, 2, 1)
    assert s["memory_bytes"] == _avatar(1).bytes


def test_no_tiers_at_all_still_builds():
    cache = AvatarCache(None, max_memory_bytes=0, max_disk_bytes=0)
    a = cache.get_or_build(_key(1), lambda: _avatar(1))
    assert a.key == _key(1) and cache.get(_key(1)) is None


# --- concurrency --------------------------------------------------------------------------------


def _race(n: int, target) -> list:
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            results[i] = target()
        except BaseException as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_get_or_build_builds_once(tmp_path):
    cache = AvatarCache(tmp_path, max_memory_bytes=100 * MB, max_disk_bytes=100 * MB)
    calls = []

    def build():
        calls.append(1)
        time.sleep(0.2)
        return _avatar(1)

    results = _race(8, lambda: cache.get_or_build(_key(1), build))
    assert len(calls) == 1
    assert all(r is results[0] for r in results) and isinstance(results[0], Avatar)
    s = cache.stats()
    assert (s["builds"], s["misses"], s["hits"], s["waits"]) == (1, 1, 7, 7)
    assert (tmp_path / _key(1) / "meta.json").is_file()
    assert cache.get_or_build(_key(1), build) is results[0] and len(calls) == 1


def test_failed_build_releases_waiters_who_build_themselves():
    cache = AvatarCache(None, max_memory_bytes=100 * MB, max_disk_bytes=0)
    calls = []
    lock = threading.Lock()

    def build():
        with lock:
            calls.append(1)
            first = len(calls) == 1
        time.sleep(0.1)
        if first:
            raise RuntimeError("out of memory")
        return _avatar(1)

    results = _race(4, lambda: cache.get_or_build(_key(1), build))
    assert len(calls) == 2  # the failed build, then one waiter's
    assert sum(isinstance(r, RuntimeError) for r in results) == 1
    avatars = [r for r in results if isinstance(r, Avatar)]
    assert len(avatars) == 3 and all(r is avatars[0] for r in avatars)
    assert cache.stats()["build_failures"] == 1 and cache.stats()["building"] == 0


def test_input_error_is_shared_with_waiters():
    cache = AvatarCache(None, max_memory_bytes=100 * MB, max_disk_bytes=0)
    calls = []

    def build():
        calls.append(1)
        time.sleep(0.1)
        raise NoFace("no face in any frame")

    results = _race(4, lambda: cache.get_or_build(_key(1), build))
    assert len(calls) == 1 and all(isinstance(r, NoFace) for r in results)


def test_waiter_cancelled():
    cache = AvatarCache(None, max_memory_bytes=100 * MB, max_disk_bytes=0)
    started, release, cancel = threading.Event(), threading.Event(), threading.Event()

    def build():
        started.set()
        release.wait(5)
        return _avatar(1)

    builder = threading.Thread(target=lambda: cache.get_or_build(_key(1), build))
    builder.start()
    started.wait(5)
    cancel.set()
    with pytest.raises(Cancelled):
        cache.get_or_build(_key(1), build, cancel=cancel)
    release.set()
    builder.join(5)
    assert cache.get(_key(1)) is not None


def test_delete_during_build_is_not_cached(tmp_path):
    cache = AvatarCache(tmp_path, max_memory_bytes=100 * MB, max_disk_bytes=100 * MB)
    started, release = threading.Event(), threading.Event()

    def build():
        started.set()
        release.wait(5)
        return _avatar(1)

    out = []
    builder = threading.Thread(target=lambda: out.append(cache.get_or_build(_key(1), build)))
    builder.start()
    started.wait(5)
    cache.delete(_key(1))
    release.set()
    builder.join(5)
    assert out and out[0].key == _key(1)  # the caller still gets it
    assert _key(1) not in cache and not (tmp_path / _key(1)).exists()


def test_concurrent_mixed_use_keeps_accounts_straight(tmp_path):
    size = _avatar().bytes
    cache = AvatarCache(tmp_path, max_memory_bytes=3 * size, max_disk_bytes=50 * MB)

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(30):
            n = int(rng.integers(1, 7))
            op = rng.integers(0, 3)
            if op == 0:
                cache.get_or_build(_key(n), lambda: _avatar(n))
            elif op == 1:
                cache.get(_key(n))
            else:
                cache.delete(_key(n))

    assert not [r for r in _race(8, lambda: work(threading.get_ident() % 1000)) if r is not None]
    s = cache.stats()
    assert s["memory_bytes"] == sum(_avatar().bytes for _ in range(s["memory_entries"]))
    assert s["memory_bytes"] <= 3 * size
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert on_disk == sorted(r["key"] for r in cache.list() if r["on_disk"])
    assert s["disk_bytes"] == sum(avatar_cache._folder_bytes(tmp_path / k) for k in on_disk)
