"""The job routes through a real server: submit, progress, result, download, cancel (queued and
running), retention, the bounded queue (429 + Retry-After, depth visible), time limits."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from musetalk_service.media.probe import probe_video
from musetalk_service.contract import PHASES
from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import (
    ControlledPipeline,
    assert_error,
    files_under,
    metric,
    wait_job,
    wait_until,
)
from tests.fixtures.processes import ffmpeg_children


def body(video: Path, audio: Path, **extra) -> dict:
    return {"video_path": str(video), "audio_path": str(audio), "face_box": SMALL_FACE_BOX, **extra}


def test_job_flow_submit_poll_result_and_download(serve, small_video, short_audio, tmp_path):
    with serve() as client:
        response = client.post("/jobs", json=body(small_video, short_audio, batch_size=2))

        assert response.status_code == 202, response.text
        accepted = response.json()
        job_id = accepted["job_id"]
        assert accepted["status"] in ("queued", "running") and accepted["status_url"] == f"/jobs/{job_id}"
        assert response.headers["location"] == f"/jobs/{job_id}"

        views = []
        while not views or views[-1]["status"] not in ("succeeded", "failed", "cancelled"):
            views.append(client.get(f"/jobs/{job_id}").json())
            time.sleep(0.01)
        done = views[-1]
        download = client.get(done["output_url"])
        kept = Path(done["result"]["output_path"]).is_file()

    # Stopping forgets every job: the output the service named went with it.
    assert not Path(done["result"]["output_path"]).exists()

    assert done["status"] == "succeeded", done
    assert {v["status"] for v in views} <= {"queued", "running", "succeeded"}
    running = [v for v in views if v["status"] == "running" and v["phase"] == "frames"]
    for view in running:  # progress: frames done of total, timings so far
        assert 0 < view["frames_done"] <= view["frames_total"] == 5
        assert view["run_s"] is not None and view["timings"]
    assert done["phase"] == "done" and done["frames_done"] == done["frames_total"] == 5
    assert set(PHASES) | {"total"} <= set(done["timings"])
    result = done["result"]
    assert result["frames"] == 5 and kept
    assert done["output_url"] == f"/jobs/{job_id}/output" and done["error"] is None
    assert download.status_code == 200 and download.headers["content-type"] == "video/mp4"
    copy = tmp_path / "downloaded.mp4"
    copy.write_bytes(download.content)
    assert probe_video(copy).frame_count == 5


def test_lipsync_is_a_job_it_waits_for(serve, small_video, short_audio):
    with serve() as client:
        response = client.post("/lipsync", json=body(small_video, short_audio))
        job = client.get(f"/jobs/{response.json()['job_id']}").json()

    assert response.status_code == 200, response.text
    assert job["status"] == "succeeded" and job["result"]["output_path"] == response.json()["output_path"]


def test_unknown_job_is_404_everywhere(serve):
    with serve() as client:
        for method, path in (("GET", "/jobs/nope"), ("DELETE", "/jobs/nope"), ("GET", "/jobs/nope/output")):
            assert_error(client.request(method, path), 404, "job_not_found", "nope")


def test_jobs_are_listed_newest_first_filtered_by_status_and_limited(serve, tiny_pipeline, small_video, short_audio):
    pipeline = ControlledPipeline(tiny_pipeline, gated=True)
    with serve(pipeline=pipeline) as client:
        running = client.post("/jobs", json=body(small_video, short_audio)).json()["job_id"]
        wait_until(lambda: len(pipeline.started) == 1, message="first job running")
        cancelled, queued = (client.post("/jobs", json=body(small_video, short_audio)).json()["job_id"] for _ in range(2))
        client.delete(f"/jobs/{cancelled}")
        listed = client.get("/jobs")
        by_status = {s: client.get("/jobs", params={"status": s}).json()["jobs"] for s in ("queued", "running", "cancelled", "succeeded")}
        first_two = client.get("/jobs", params={"limit": 2}).json()["jobs"]
        bad = [("status", "done"), ("status", ""), ("limit", 0), ("limit", 501), ("limit", "many")]
        refused = [(name, client.get("/jobs", params={name: value})) for name, value in bad]
        pipeline.gate.set()
        wait_job(client, queued)
        later = [j["status"] for j in client.get("/jobs", params={"limit": 500}).json()["jobs"]]

    assert listed.status_code == 200, listed.text
    jobs = listed.json()["jobs"]
    assert [j["job_id"] for j in jobs] == [queued, cancelled, running]
    assert [j["status"] for j in jobs] == ["queued", "cancelled", "running"]
    assert jobs[0] == {**jobs[0], "queue_position": 1, "status_url": f"/jobs/{queued}", "output_url": None}
    assert [[j["job_id"] for j in by_status[s]] for s in ("queued", "running", "cancelled")] == [[queued], [running], [cancelled]]
    assert by_status["succeeded"] == []
    assert [j["job_id"] for j in first_two] == [queued, cancelled]
    for name, response in refused:
        assert_error(response, 400, "invalid_option", f"{name}: ")
    assert later == ["succeeded", "cancelled", "succeeded"]


def test_a_new_job_shows_its_phase_and_frames_total_from_submission(serve, tiny_pipeline, small_video, make_audio):
    # Each track and rate as the pipeline will count it: 0.5 s is 12 frames at 25 fps, 14 at 30000/1001.
    cases = [(make_audio(0.5, ".wav", 44100), None), (make_audio(0.5, ".m4a"), "30000/1001"), (make_audio(0.5, ".mp3"), 24)]
    pipeline = ControlledPipeline(tiny_pipeline, gated=True)
    with serve(pipeline=pipeline) as client:
        ids = []
        for audio, fps in cases:
            extra = {"fps": fps} if fps else {}
            ids.append(client.post("/jobs", json=body(small_video, audio, **extra)).json()["job_id"])
        wait_until(lambda: len(pipeline.started) == 1, message="first job running")
        first_views = [client.get(f"/jobs/{job_id}").json() for job_id in ids]
        pipeline.gate.set()
        done = [wait_job(client, job_id) for job_id in ids]

    assert [(v["status"], v["phase"]) for v in first_views] == [("running", "starting"), ("queued", "queued"), ("queued", "queued")]
    assert [v["frames_done"] for v in first_views] == [0, 0, 0]
    assert [v["status"] for v in done] == ["succeeded"] * 3
    assert [v["frames_total"] for v in first_views] == [v["result"]["frames"] for v in done]
    assert [v["result"]["frames"] for v in done] == [12, 14, 12]
    assert "queued" not in done[1]["timings"] and "starting" not in done[1]["timings"]  # the pipeline's own, once done


def test_cancel_a_queued_job_ends_it_at_once_and_it_never_runs(serve, tiny_pipeline, small_video, short_audio):
    pipeline = ControlledPipeline(tiny_pipeline, gated=True)
    with serve(pipeline=pipeline) as client:
        first = client.post("/jobs", json=body(small_video, short_audio)).json()["job_id"]
        second = client.post("/jobs", json=body(small_video, short_audio)).json()["job_id"]
        wait_until(lambda: len(pipeline.started) == 1, message="first job running")

        cancelled = client.delete(f"/jobs/{second}")
        pipeline.gate.set()
        first_done = wait_job(client, first)
        again = client.delete(f"/jobs/{second}")  # idempotent

    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["error"]["code"] == "cancelled"
    assert again.json()["status"] == "cancelled"
    assert first_done["status"] == "succeeded"
    assert pipeline.runs == 1


def test_cancel_a_running_job_stops_it_ends_its_ffmpeg_and_removes_its_files(
    serve, tiny_settings, make_audio, small_video, short_audio, tmp_path
):
    output = tmp_path / "out.mp4"
    with serve() as client:
        job_id = client.post("/jobs", json=body(small_video, make_audio(2.0), batch_size=1, output_path=str(output))).json()["job_id"]
        wait_job(client, job_id, until=("running",))
        wait_until(lambda: client.get(f"/jobs/{job_id}").json()["frames_done"] >= 2, message="two batches done")

        response = client.delete(f"/jobs/{job_id}")
        done = wait_job(client, job_id)
        after = client.post("/lipsync", json=body(small_video, short_audio))

    assert response.status_code in (200, 202)
    if response.status_code == 202:
        assert response.json()["cancel_requested"] is True
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
    assert done["frames_done"] < done["frames_total"] == 50
    assert not output.exists() and not list(tmp_path.glob("*.part"))
    assert ffmpeg_children() == []
    assert files_under(Path(tiny_settings.work_dir), tmp_path / "work") == []
    assert after.status_code == 200, after.text


def test_finished_jobs_are_forgotten_and_their_outputs_removed(serve, small_video, short_audio, tmp_path):
    explicit = tmp_path / "mine.mp4"
    with serve(jobs={"keep_finished_s": 1.5}) as client:
        auto = client.post("/lipsync", json=body(small_video, short_audio)).json()
        kept = client.get(f"/jobs/{auto['job_id']}").status_code
        own = client.post("/lipsync", json=body(small_video, short_audio, output_path=str(explicit))).json()
        assert kept == 200
        wait_until(lambda: client.get(f"/jobs/{auto['job_id']}").status_code == 404, timeout=10, message="forgotten")
        wait_until(lambda: client.get(f"/jobs/{own['job_id']}").status_code == 404, timeout=10, message="forgotten")

    assert not Path(auto["output_path"]).exists()  # the service named it: its file
    assert explicit.is_file()  # the client named it: the client's file


def test_full_queue_is_429_with_retry_after_and_its_depth_is_visible(serve, tiny_pipeline, small_video, short_audio):
    pipeline = ControlledPipeline(tiny_pipeline, gated=True)
    with serve(pipeline=pipeline, jobs={"max_queue": 2}) as client:
        running = client.post("/jobs", json=body(small_video, short_audio)).json()["job_id"]
        wait_until(lambda: len(pipeline.started) == 1, message="first job running")
        queued = [client.post("/jobs", json=body(small_video, short_audio)) for _ in range(2)]
        refused = client.post("/jobs", json=body(small_video, short_audio))
        refused_sync = client.post("/lipsync", json=body(small_video, short_audio))
        ready = client.get("/ready").json()
        depth = metric(client, "musetalk_queue_depth")
        positions = [client.get(f"/jobs/{r.json()['job_id']}").json()["queue_position"] for r in queued]
        pipeline.gate.set()
        outcomes = [wait_job(client, j)["status"] for j in [running] + [r.json()["job_id"] for r in queued]]

    assert [r.status_code for r in queued] == [202, 202]
    for response in (refused, refused_sync):
        assert_error(response, 429, "queue_full", "2 jobs waiting")
        assert int(response.headers["retry-after"]) >= 1
    assert ready["queue_depth"] == 2 and ready["max_queue"] == 2 and ready["jobs_running"] == 1
    assert depth == 2
    assert positions == [1, 2]
    assert outcomes == ["succeeded"] * 3


def test_time_limit_ends_running_and_queued_jobs_with_a_clear_error(serve, tiny_pipeline, small_video, short_audio):
    # The first run is held past its limit and only then stops (as a long batch would), so the
    # queued job's own limit passes while it waits.
    pipeline = ControlledPipeline(tiny_pipeline, gated=True, honour_cancel=False)
    with serve(pipeline=pipeline, jobs={"time_limit_s": 1.0}) as client:
        results: dict[str, object] = {}
        sync = threading.Thread(target=lambda: results.update(sync=client.post("/lipsync", json=body(small_video, short_audio))))
        sync.start()
        wait_until(lambda: len(pipeline.started) == 1, message="first job running")
        queued = client.post("/jobs", json=body(small_video, short_audio)).json()["job_id"]
        queued_view = wait_job(client, queued)
        pipeline.gate.set()
        sync.join(timeout=30)
        after = client.post("/lipsync", json=body(small_video, short_audio))
        timed_out = metric(client, "musetalk_jobs_total", outcome="timed_out")

    error = assert_error(results["sync"], 504, "time_limit_exceeded", "time limit of 1 s")
    assert "stopped" in error["message"]
    assert queued_view["status"] == "failed" and queued_view["error"]["code"] == "time_limit_exceeded"
    assert queued_view["started_at"] is None and "never started" in queued_view["error"]["message"]
    assert timed_out == 2
    assert after.status_code == 200, after.text


@pytest.mark.parametrize("route", ["/jobs", "/lipsync"])
def test_submissions_before_the_models_are_loaded_are_503(serve, tiny_pipeline, route, small_video, short_audio, monkeypatch):
    gate = threading.Event()
    monkeypatch.setattr("musetalk_service.pipeline.runner.LipsyncPipeline.load", classmethod(lambda cls, s: gate.wait(30) and tiny_pipeline))
    from musetalk_service.api.app import create_app
    from tests.api.live import live_server, wait_ready

    with live_server(create_app(tiny_pipeline.settings)) as client:
        refused = client.post(route, json=body(small_video, short_audio))
        gate.set()
        ready = wait_ready(client)
        accepted = client.post(route, json=body(small_video, short_audio))

    assert_error(refused, 503, "not_ready", "loading")
    assert ready.status_code == 200
    assert accepted.status_code in (200, 202), accepted.text
