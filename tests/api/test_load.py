"""Load and soak through a real server and the real tiny pipeline.

Load: 200 submissions from 8 clients at once against a queue of 8: each is accepted (and then
succeeds) or refused with 429 + Retry-After; none is lost, none hangs.
Soak: sequential jobs (JSON paths and multipart uploads in turn) leave open file descriptors,
threads, child processes and temp files where they started.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import fd_targets, files_under, metric, native_threads, wait_until
from tests.fixtures.processes import child_processes

CLIENTS = 8
REQUESTS_PER_CLIENT = 25
SOAK_JOBS = int(os.environ.get("MUSETALK_SOAK_JOBS", "300"))


def test_200_requests_from_8_clients_against_a_queue_of_8(serve, small_video, blip_audio):
    body = {"video_path": str(small_video), "audio_path": str(blip_audio), "face_box": SMALL_FACE_BOX}
    answers: list[tuple[int, str | None, str | None]] = []
    lock = threading.Lock()
    started = time.monotonic()
    with serve(jobs={"max_queue": 8}) as client:
        base = str(client.base_url)

        def submit_all() -> None:
            with httpx.Client(base_url=base, timeout=30) as own:
                for _ in range(REQUESTS_PER_CLIENT):
                    response = own.post("/jobs", json=body)
                    job_id = response.json().get("job_id") if response.status_code == 202 else None
                    with lock:
                        answers.append((response.status_code, job_id, response.headers.get("retry-after")))

        depths: list[int] = []
        clients = [threading.Thread(target=submit_all) for _ in range(CLIENTS)]
        for thread in clients:
            thread.start()
        while any(t.is_alive() for t in clients):
            depths.append(client.get("/ready").json()["queue_depth"])
            time.sleep(0.01)
        for thread in clients:
            thread.join()

        accepted = [job_id for status, job_id, _ in answers if status == 202]
        finished: dict[str, dict] = {}
        deadline = time.monotonic() + 120
        while len(finished) < len(accepted):
            assert time.monotonic() < deadline, f"{len(accepted) - len(finished)} jobs never finished"
            for job_id in accepted:
                if job_id not in finished:
                    view = client.get(f"/jobs/{job_id}").json()
                    if view["status"] in ("succeeded", "failed", "cancelled"):
                        finished[job_id] = view
            time.sleep(0.05)
        refused_count = metric(client, "musetalk_requests_total", route="/jobs", outcome="queue_full")
        accepted_count = metric(client, "musetalk_requests_total", route="/jobs", outcome="ok")
    took = time.monotonic() - started

    statuses = [status for status, _, _ in answers]
    assert len(answers) == CLIENTS * REQUESTS_PER_CLIENT  # none lost, none hung
    assert set(statuses) <= {202, 429}, statuses
    refused = [retry for status, _, retry in answers if status == 429]
    assert all(retry is not None and int(retry) >= 1 for retry in refused)
    assert len(accepted) + len(refused) == 200 and len(accepted) >= 9
    assert len(set(accepted)) == len(accepted)
    assert all(view["status"] == "succeeded" for view in finished.values()), [
        v["error"] for v in finished.values() if v["status"] != "succeeded"
    ]
    assert max(depths) <= 8
    assert (accepted_count, refused_count) == (len(accepted), len(refused))
    print(f"\nload: {len(accepted)} accepted and run, {len(refused)} refused with 429, in {took:.1f} s")
    assert took < 90


POOLED = "AnyIO worker thread"
"""anyio's worker pool: bounded (40), reused, and idle workers exit on their own after 10 s, so
its size drifts with timing; it is checked for its bound, the other threads for equality."""


def _resources(tiny_settings, tmp_path: Path) -> dict:
    gc.collect()  # objects of earlier tests (sockets, pipes) close when collected, not at a fixed time
    return {
        "fds": fd_targets(),
        "threads": native_threads() - _pooled(),
        "python_threads": Counter(t.name for t in threading.enumerate() if t.name != POOLED),
        "children": child_processes(),
        "temp_files": files_under(Path(tiny_settings.work_dir), tmp_path / "work"),
        "outputs": files_under(tmp_path / "outputs"),
    }


def _pooled() -> int:
    return sum(t.name == POOLED for t in threading.enumerate())


def _leaks(before: dict, after: dict) -> dict:
    """What the soak left behind. Descriptors and threads may only have gone (an earlier test's
    idle keep-alive connection times out meanwhile); nothing may be new."""
    leaks = {
        "fds": sorted(after["fds"] - before["fds"]),
        "python_threads": sorted((after["python_threads"] - before["python_threads"]).elements()),
        "children": after["children"],
        "temp_files": after["temp_files"],
        "outputs": after["outputs"],
    }
    if after["threads"] > before["threads"]:
        leaks["threads"] = after["threads"] - before["threads"]
    return {k: v for k, v in leaks.items() if v}


def test_soak_sequential_jobs_leave_fds_threads_children_and_temp_files_as_they_were(
    serve, tiny_settings, small_video, blip_audio, tmp_path
):
    body = {"video_path": str(small_video), "audio_path": str(blip_audio), "face_box": SMALL_FACE_BOX}
    video_bytes, audio_bytes = small_video.read_bytes(), blip_audio.read_bytes()
    with serve(jobs={"keep_finished_s": 0.2}) as client:

        def one(i: int) -> None:
            if i % 3 == 2:  # every third: a multipart upload
                files = {"video": ("v.mp4", video_bytes, "video/mp4"), "audio": ("a.wav", audio_bytes, "audio/wav")}
                response = client.post("/lipsync", files=files, data={"face_box": json.dumps(SMALL_FACE_BOX)})
            else:
                response = client.post("/lipsync", json=body)
            assert response.status_code == 200, (i, response.text)

        for i in range(3):  # warm-up: pools and caches reach their steady size
            one(i)
        wait_until(lambda: files_under(tmp_path / "outputs") == [], timeout=10, message="warm-up jobs forgotten")
        before = _resources(tiny_settings, tmp_path)
        assert before["children"] == [] and before["temp_files"] == [] and before["outputs"] == []
        started = time.monotonic()
        for i in range(SOAK_JOBS):
            one(i)
        took = time.monotonic() - started
        wait_until(lambda: files_under(tmp_path / "outputs") == [], timeout=10, message="soak jobs forgotten")
        # A job's threads and processes are reaped as it ends; give the last one a moment.
        deadline = time.monotonic() + 10
        while _leaks(before, _resources(tiny_settings, tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        leaks = _leaks(before, _resources(tiny_settings, tmp_path))
        succeeded = metric(client, "musetalk_jobs_total", outcome="succeeded")

    print(f"\nsoak: {SOAK_JOBS} jobs in {took:.1f} s ({took / SOAK_JOBS * 1000:.0f} ms a job)")
    assert succeeded == SOAK_JOBS + 3
    assert leaks == {}
    assert _pooled() <= 40
