"""Uploads and limits: multipart for curl users (size-limited, streamed to disk, removed after the
job), and duration, resolution and frame-count limits, each a clear 4xx before any GPU work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from musetalk_service.media.probe import probe_video
from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import ControlledPipeline, assert_error, files_under, wait_job


def upload(client, route: str, video: Path | None, audio: Path | None, **fields):
    files = {}
    if video is not None:
        files["video"] = (video.name, video.read_bytes(), "video/mp4")
    if audio is not None:
        files["audio"] = (audio.name, audio.read_bytes(), "audio/wav")
    return client.post(route, files=files, data=fields)


def test_upload_job_then_download_and_the_upload_is_removed(serve, tiny_pipeline, small_video, short_audio, tmp_path):
    pipeline = ControlledPipeline(tiny_pipeline, gated=True)
    with serve(pipeline=pipeline) as client:
        response = upload(client, "/jobs", small_video, short_audio, options=json.dumps({"face_box": SMALL_FACE_BOX, "batch_size": 4}))
        held = sorted(p.name for p in files_under(tmp_path / "work") if p.is_file())  # kept while the job waits or runs
        pipeline.gate.set()
        done = wait_job(client, response.json()["job_id"])
        download = client.get(done["output_url"])
        after = files_under(tmp_path / "work")

    assert response.status_code == 202, response.text
    assert held == ["audio.wav", "video.mp4"]
    assert done["status"] == "succeeded", done
    (tmp_path / "got.mp4").write_bytes(download.content)
    assert probe_video(tmp_path / "got.mp4").frame_count == 5
    assert after == []


def test_upload_audio_with_a_video_path_and_fields_as_form_values(serve, small_video, short_audio):
    with serve() as client:
        response = upload(client, "/lipsync", None, short_audio, video_path=str(small_video),
                          face_box=json.dumps(SMALL_FACE_BOX), parsing_mode="raw", batch_size="2")

    assert response.status_code == 200, response.text
    assert response.json()["frames"] == 5


@pytest.mark.parametrize(
    ("files", "fields", "status", "code", "named"),
    [
        ({"picture": ("x.png", b"123")}, {}, 400, "invalid_upload", ("picture", "audio, video")),
        ({"video": ("v.mp4", b"123"), "audio": ("a.wav", b"1")}, {"video_path": "/x.mp4"}, 400, "invalid_option", ("video_path",)),
        ({"audio": ("a.wav", b"1")}, {"video": "not a file"}, 400, "invalid_upload", ("video", "-F video=@FILE")),
        ({"video": ("v.mp4", b"1"), "audio": ("a.wav", b"1")}, {"options": "{nope"}, 400, "invalid_option", ("options",)),
        ({"video": ("v.mp4", b"1"), "audio": ("a.wav", b"1")}, {"batch_size": "0"}, 400, "invalid_option", ("batch_size",)),
        ({"video": ("v.mp4", b"1"), "audio": ("a.wav", b"1")}, {}, 422, "not_a_video", ()),
    ],
)
def test_bad_uploads_get_their_4xx_and_leave_nothing(serve, tmp_path, files, fields, status, code, named):
    with serve() as client:
        response = client.post("/jobs", files=files, data=fields)
        ready = client.get("/ready").status_code

    assert_error(response, status, code, *named)
    assert files_under(tmp_path / "work") == []
    assert ready == 200


def test_upload_over_the_size_limit_is_413_declared_or_streamed(serve, small_video, short_audio, talking_head_video, tmp_path):
    limit = small_video.stat().st_size + short_audio.stat().st_size + 2048  # room for the multipart framing
    assert talking_head_video.stat().st_size > limit
    with serve(limits={"max_upload_bytes": limit}) as client:
        declared = upload(client, "/lipsync", talking_head_video, short_audio)
        boundary = "xyz"
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="v.mp4"\r\n\r\n'.encode()

        def chunks():  # no Content-Length: the limit is enforced while streaming
            yield head
            for _ in range(limit // 1000 + 2):
                yield b"\0" * 1000
            yield f"\r\n--{boundary}--\r\n".encode()

        streamed = client.post("/jobs", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        fits = upload(client, "/lipsync", small_video, short_audio, face_box=json.dumps(SMALL_FACE_BOX))

    assert_error(declared, 413, "upload_too_large", f"{limit} bytes", "limits.max_upload_bytes")
    assert_error(streamed, 413, "upload_too_large")
    assert fits.status_code == 200, fits.text
    assert files_under(tmp_path / "work") == []


def test_json_body_over_64_kib_is_413(serve):
    with serve() as client:
        response = client.post("/jobs", json={"video_path": "x" * 70_000, "audio_path": "a.wav"})

    assert_error(response, 413, "body_too_large")


@pytest.mark.parametrize(
    ("limits", "extra", "code", "named"),
    [
        ({"max_video_seconds": 0.3}, {}, "video_too_long", ("0.4 s", "limits.max_video_seconds")),
        ({"max_audio_seconds": 0.1}, {}, "audio_too_long", ("0.2 s", "limits.max_audio_seconds")),
        ({"max_frames": 4}, {}, "too_many_frames", ("5 frames", "limits.max_frames")),
        ({"max_frames": 5}, {"fps": 50}, "too_many_frames", ("10 frames", "50 fps")),
        ({"max_pixels": 128 * 127}, {}, "resolution_too_large", ("128x128", "limits.max_pixels")),
    ],
)
def test_limits_are_422_naming_the_limit_before_any_gpu_work(serve, tiny_pipeline, small_video, short_audio, limits, extra, code, named):
    pipeline = ControlledPipeline(tiny_pipeline)
    with serve(pipeline=pipeline, limits=limits) as client:
        body = {"video_path": str(small_video), "audio_path": str(short_audio), "face_box": SMALL_FACE_BOX, **extra}
        response = client.post("/jobs", json=body)

    assert_error(response, 422, code, *named)
    assert pipeline.runs == 0


@pytest.mark.parametrize("field", ["options", "face_box"])
def test_deeply_nested_json_in_a_form_field_is_400_naming_it(serve, small_video, short_audio, field):
    # json.loads raises RecursionError at this depth: a 400 naming the part, not a 500.
    with serve() as client:
        response = upload(client, "/jobs", small_video, short_audio, **{field: "[" * 60_000})
        assert_error(response, 400, "invalid_request", field, "nested too deeply")
