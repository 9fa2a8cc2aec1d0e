"""The API on Ray Serve (serve_ray/): a real local Ray cluster on CPU, 2 engine replicas on tiny weights.

The core API tests run in both modes (`mode`: the embedded server, and the Ray Serve application
through Ray's HTTP proxy) with the same settings; the Ray-only ones cover what one process does
not have: replica counts, avatar affinity, a replica killed mid-job, media fetched by the replica.
One deployment serves the module (starting Ray and two replicas is the slow part).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from musetalk_service.media.mux import partial_outputs
from musetalk_service.media.probe import probe_video
from musetalk_service.serve_ray.app import ENGINE, build
from musetalk_service.serve_ray.replica import replica_work_dir
from musetalk_service.settings import CacheSettings, Settings, UrlSettings
from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import assert_error, wait_job, wait_until
from tests.api.live import wait_ready

REPLICAS = 2
MAX_QUEUE = 1
APP = "musetalk-test"


@dataclass
class Mode:
    name: str
    client: httpx.Client
    concurrency: int
    """Jobs that run at once: 1 embedded, one per engine replica on Ray."""


def mode_settings(tmp: Path) -> dict:
    """What both modes change in the session's tiny settings."""
    return {
        "jobs": {"max_queue": MAX_QUEUE},
        "cache": CacheSettings(dir=tmp / "avatars"),
        "urls": UrlSettings(allowed_hosts=["127.0.0.1"], retry_backoff_s=0.01),
    }


@pytest.fixture(scope="module")
def ray_work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray-work")


@pytest.fixture(scope="module")
def ray_app(tiny_settings: Settings, ray_work_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A local Ray cluster (2 CPUs) running the application: 2 engine replicas on CPU, its HTTP
    proxy on a free loopback port. Stopped, with every Ray process, at the end of the module."""
    tmp = tmp_path_factory.mktemp("ray")
    changes = mode_settings(tmp)
    settings = tiny_settings.model_copy(
        update={
            **changes,
            "jobs": tiny_settings.jobs.model_copy(update=changes["jobs"]),
            "output_dir": tmp / "outputs",
            "work_dir": ray_work_dir,
            "ray": tiny_settings.ray.model_copy(update={"engine_replicas": REPLICAS, "cpus_per_replica": 0.5, "ingress_cpus": 0.1}),
        }
    )
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(settings), name=APP, route_prefix="/", blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            ready = wait_ready(client, timeout=240)
            assert ready.status_code == 200, ready.text
            wait_until(lambda: client.get("/ready").json()["replicas"]["ready"] == REPLICAS, timeout=120, message="both replicas ready")
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()
    wait_until(lambda: not _ray_processes(), timeout=30, message="every Ray process ended")


@pytest.fixture(params=["embedded", "ray"])
def mode(request: pytest.FixtureRequest, serve, tmp_path: Path) -> Iterator[Mode]:
    if request.param == "ray":
        yield Mode("ray", request.getfixturevalue("ray_app"), REPLICAS)
        return
    with serve(**mode_settings(tmp_path)) as client:
        yield Mode("embedded", client, 1)


def _ray_processes() -> list[str]:
    """Command lines of this test process's descendants that are Ray's (GCS, raylet, workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # ended while listing
                continue
    mine, found = {os.getpid()}, []
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in mine and pid not in mine:
                mine.add(pid)
                changed = True
    for pid in mine - {os.getpid()}:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ray" in cmdline:
            found.append(cmdline)
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def long_audio(make_audio) -> Path:
    """8 s of speech: 200 output frames, a job that runs long enough to be watched and cancelled."""
    return make_audio(8.0)


def lipsync_body(video: Path, audio: Path, **extra) -> dict:
    return {"video_path": str(video), "audio_path": str(audio), "face_box": SMALL_FACE_BOX, "batch_size": 2, **extra}


def start_running(client: httpx.Client, body: dict) -> str:
    """Submit a job and wait until the engine reports frames of it; its id."""
    response = client.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    wait_job(client, job_id, timeout=120, until=("running", "succeeded", "failed", "cancelled"))
    wait_until(lambda: client.get(f"/jobs/{job_id}").json()["frames_total"] > 0, timeout=120, message="the job reports progress")
    return job_id


def cancel(client: httpx.Client, job_id: str) -> dict:
    client.delete(f"/jobs/{job_id}")
    return wait_job(client, job_id, timeout=120)


# --- both modes ---------------------------------------------------------------------------------


def test_lipsync_end_to_end(mode: Mode, small_video, short_audio, tmp_path):
    output = tmp_path / f"{mode.name}.mp4"
    response = mode.client.post("/lipsync", json=lipsync_body(small_video, short_audio, output_path=str(output)))
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["frames"] == 5 and result["output_path"] == str(output)
    assert probe_video(output).frame_count == 5
    if mode.name == "ray":
        assert result["engine_replica"]  # which replica made it
    else:
        assert result["engine_replica"] is None


def test_engine_error_is_the_same_4xx(mode: Mode, web_store, short_audio):
    """An error raised where the job runs (on Ray: in the replica, which fetches by URL) reaches
    the client with the same code, status and message."""
    body = {"video_url": f"{web_store.base_url}/media/nothing.mp4", "audio_url": web_store.serve_file("e.wav", short_audio),
            "face_box": SMALL_FACE_BOX}
    assert_error(mode.client.post("/lipsync", json=body), 422, "source_http_error", "video_url", "HTTP 404", "/media/nothing.mp4")


def test_job_status_progress_and_cancel(mode: Mode, small_video, long_audio, short_audio, tmp_path):
    output = tmp_path / f"cancelled-{mode.name}.mp4"
    job_id = start_running(mode.client, lipsync_body(small_video, long_audio, output_path=str(output)))
    view = mode.client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "running" and view["phase"] is not None and view["frames_total"] == 200, view
    response = mode.client.delete(f"/jobs/{job_id}")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True, response.text
    view = wait_job(mode.client, job_id, timeout=120)
    assert view["status"] == "cancelled", view
    assert not output.exists()  # nothing half-written
    response = mode.client.post("/lipsync", json=lipsync_body(small_video, short_audio))
    assert response.status_code == 200, response.text  # the engine (replica) takes the next job


def test_queue_full_429_and_cancel_queued(mode: Mode, small_video, long_audio):
    """One bounded queue for the deployment: the engines busy plus `max_queue` waiting, then 429."""
    client = mode.client
    running = [start_running(client, lipsync_body(small_video, long_audio)) for _ in range(mode.concurrency)]
    try:
        assert client.get("/ready").json()["jobs_running"] == mode.concurrency
        queued = client.post("/jobs", json=lipsync_body(small_video, long_audio))
        assert queued.status_code == 202 and queued.json()["queue_position"] == 1, queued.text
        full = client.post("/jobs", json=lipsync_body(small_video, long_audio))
        assert_error(full, 429, "queue_full")
        assert int(full.headers["Retry-After"]) >= 1
        response = client.delete(f"/jobs/{queued.json()['job_id']}")
        assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
    finally:
        views = [cancel(client, job_id) for job_id in running]
    assert [v["status"] for v in views] == ["cancelled"] * mode.concurrency
    wait_until(lambda: client.get("/ready").json()["jobs_running"] == 0, timeout=60, message="no job running")


def test_ready_reports_replicas(mode: Mode):
    body = mode.client.get("/ready").json()
    if mode.name == "ray":
        assert body["replicas"] == {"ready": REPLICAS, "total": REPLICAS}
    else:
        assert "replicas" not in body


# --- Ray only -----------------------------------------------------------------------------------


def test_avatar_affinity(ray_app, make_video, short_audio):
    """Repeat requests on one avatar land on one replica (Ray Serve multiplexing on its id)."""
    video = make_video(0.4, 25, (128, 128), motion=False)  # a video of its own: a new avatar
    response = ray_app.post("/avatars", json={"video_path": str(video), "face_box": SMALL_FACE_BOX})
    assert response.status_code == 201, response.text
    avatar_id = response.json()["avatar_id"]
    replicas = []
    for _ in range(3):
        response = ray_app.post("/lipsync", json={"avatar_id": avatar_id, "audio_path": str(short_audio), "batch_size": 2})
        assert response.status_code == 200, response.text
        assert response.json()["avatar_id"] == avatar_id
        replicas.append(response.json()["engine_replica"])
    assert len(set(replicas)) == 1, replicas


def test_media_by_url_fetched_by_the_replica(ray_app, web_store, small_video, short_audio):
    """No shared path: the replica GETs the sources and PUTs the output itself."""
    body = {
        "video_url": web_store.serve_file("ray.mp4", small_video),
        "audio_url": web_store.serve_file("ray.wav", short_audio),
        "output_url": web_store.put_url("ray-out.mp4"),
        "face_box": SMALL_FACE_BOX,
        "batch_size": 2,
    }
    response = ray_app.post("/lipsync", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["output_uploaded_to"] == f"{web_store.base_url}/put/ray-out.mp4"
    [put] = web_store.puts["ray-out.mp4"]
    assert put.body[4:8] == b"ftyp"  # an MP4


def test_replica_killed_mid_job(ray_app, ray_work_dir, small_video, long_audio, short_audio, tmp_path):
    """Both replicas busy, one killed: its job fails with engine_lost (503), nothing written; the
    other job goes on, the next job runs, and Ray replaces the replica."""
    outputs = [tmp_path / f"kill-{n}.mp4" for n in range(REPLICAS)]
    jobs = [start_running(ray_app, lipsync_body(small_video, long_audio, output_path=str(out))) for out in outputs]
    victim = _replica_actors()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    wait_until(
        lambda: any(ray_app.get(f"/jobs/{job_id}").json()["status"] == "failed" for job_id in jobs), timeout=60,
        message="the killed replica's job failed",
    )
    views = {job_id: ray_app.get(f"/jobs/{job_id}").json() for job_id in jobs}
    [lost] = [v for v in views.values() if v["status"] == "failed"]
    assert lost["error"]["code"] == "engine_lost" and "died" in lost["error"]["message"], lost
    assert not outputs[jobs.index(lost["job_id"])].exists()
    assert partial_outputs(outputs[jobs.index(lost["job_id"])]) == []
    assert not replica_work_dir(ray_work_dir, victim.rsplit("#", 1)[1]).exists()  # its temp files removed
    [survivor] = [job_id for job_id, v in views.items() if v["status"] == "running"]
    assert cancel(ray_app, survivor)["status"] == "cancelled"
    assert ray_app.get("/ready").status_code == 200  # one replica is still ready
    response = ray_app.post("/lipsync", json=lipsync_body(small_video, short_audio))
    assert response.status_code == 200, response.text
    wait_until(lambda: ray_app.get("/ready").json()["replicas"]["ready"] == REPLICAS, timeout=180, message="the replica replaced")


def _replica_actors() -> list[str]:
    """Names of the engine deployment's replica actors."""
    prefix = f"SERVE_REPLICA::{APP}#{ENGINE}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def test_serve_ray_refuses_zero_replicas(tiny_models_dir, capsys):
    from musetalk_service.cli import EXIT_CANNOT_START, main

    assert main(["serve", "--ray", "--replicas", "0", "--models", str(tiny_models_dir), "--device", "cpu"]) == EXIT_CANNOT_START
    assert "--replicas must be at least 1" in capsys.readouterr().err
