"""GET /metrics after real traffic, and the structured job log lines (no media, no secrets)."""

from __future__ import annotations

import json
import logging

from musetalk_service.errors import NoFace
from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import ControlledPipeline, metrics


def test_metrics_after_real_traffic(serve, tiny_pipeline, small_video, short_audio, tmp_path):
    pipeline = ControlledPipeline(tiny_pipeline)
    pipeline.gpu_memory_value = {"allocated": 1024.0, "reserved": 4096.0}
    body = {"video_path": str(small_video), "audio_path": str(short_audio), "face_box": SMALL_FACE_BOX}
    with serve(pipeline=pipeline) as client:
        ok = client.post("/lipsync", json=body)
        again = client.post("/lipsync", json=body)  # the same video and options: an avatar cache hit
        bad = client.post("/lipsync", json={**body, "audio_path": str(tmp_path / "nope.wav")})
        client.get("/jobs/nope")
        m = metrics(client)

    assert ok.status_code == again.status_code == 200 and bad.status_code == 400

    def value(name, **labels):
        return m.get((name, tuple(sorted(labels.items()))))

    assert value("musetalk_requests_total", route="/lipsync", outcome="ok") == 2
    assert value("musetalk_requests_total", route="/lipsync", outcome="file_not_found") == 1
    assert value("musetalk_requests_total", route="/jobs/{job_id}", outcome="job_not_found") == 1
    assert value("musetalk_queue_depth") == 0 and value("musetalk_jobs_running") == 0
    assert value("musetalk_jobs_total", outcome="succeeded") == 2
    assert value("musetalk_job_duration_seconds_count", outcome="succeeded") == 2
    assert value("musetalk_job_queue_wait_seconds_count") == 2
    for phase in ("audio", "unet", "blend", "encode", "mux"):
        assert value("musetalk_phase_seconds_total", phase=phase) > 0, phase
    assert value("musetalk_frames_total") == 10
    assert value("musetalk_output_fps") > 0
    assert value("musetalk_avatar_cache_hits_total") >= 1
    assert value("musetalk_avatar_cache_misses_total") is not None
    assert value("musetalk_gpu_memory_bytes", kind="allocated") == 1024
    assert value("musetalk_gpu_memory_bytes", kind="reserved") == 4096


def test_the_real_pipeline_on_cpu_reports_no_gpu_memory(client):
    text = client.get("/metrics").text

    assert "musetalk_gpu_memory_bytes{" not in text


def test_one_structured_line_per_job_event_without_media_or_secrets(serve, tiny_pipeline, small_video, short_audio, caplog):
    key = "k3y-that-must-not-leak"
    pipeline = ControlledPipeline(tiny_pipeline)
    body = {"video_path": str(small_video), "audio_path": str(short_audio), "face_box": SMALL_FACE_BOX}
    caplog.set_level(logging.INFO)
    with serve(pipeline=pipeline, api_key=key, headers={"X-API-Key": key}) as client:
        ok = client.post("/lipsync", json=body).json()
        failed = client.post("/jobs", json={**body, "video_path": str(short_audio)})
        pipeline.fail_with = NoFace(f"{small_video}: no face found in any of the 10 frames tried")
        no_face = client.post("/lipsync", json=body)

    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "musetalk_service.api.jobs"]
    mine = [e for e in events if e["job_id"] == ok["job_id"]]
    assert [e["event"] for e in mine] == ["job_submitted", "job_started", "job_succeeded"]
    done = mine[-1]
    assert done["status"] == "succeeded" and done["timings"]["total"] > 0 and done["run_s"] >= 0
    assert failed.status_code == 422  # refused before it became a job: no job lines for it
    assert no_face.status_code == 422 and no_face.json()["error"]["code"] == "no_face"
    last = events[-1]
    assert last["event"] == "job_failed" and last["error_code"] == "no_face" and "run_s" in last
    text = caplog.text
    assert key not in text
    for event in events:  # job lines carry ids, timings and outcomes, not request fields
        line = json.dumps({k: v for k, v in event.items() if k != "error_message"})  # (an error names its file)
        assert str(small_video) not in line and str(short_audio) not in line
    assert not any(isinstance(r.msg, bytes) for r in caplog.records)
