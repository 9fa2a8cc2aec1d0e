"""Media, outputs and callbacks by URL, against a real HTTP server on loopback (tests/fixtures/web.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket

import pytest

from musetalk_service.media.probe import probe_audio, probe_video
from musetalk_service.settings import UrlSettings
from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import assert_error, files_under, wait_job, wait_until

SECRET = "s3cret"


def url_settings(**changes) -> UrlSettings:
    return UrlSettings(allowed_hosts=["127.0.0.1"], retry_backoff_s=0.01, callback_secret=SECRET, **changes)


def test_media_by_url_end_to_end(serve, web_store, small_video, short_audio, tmp_path):
    """Fetched sources, the MP4 PUT to its URL, the final status POSTed once, signed; no files left."""
    body = {
        "video_url": web_store.serve_file("e2e.mp4", small_video),
        "audio_url": web_store.serve_file("e2e.wav", short_audio),
        "output_url": web_store.put_url("e2e-out.mp4"),
        "callback_url": web_store.callback_url("e2e"),
        "face_box": SMALL_FACE_BOX,
        "batch_size": 2,
    }
    with serve(urls=url_settings()) as client:
        response = client.post("/jobs", json=body)
        assert response.status_code == 202, response.text
        view = wait_job(client, response.json()["job_id"])
        assert view["status"] == "succeeded", view
        result = view["result"]
        assert result["output_uploaded_to"] == f"{web_store.base_url}/put/e2e-out.mp4"  # no query: it is a credential
        assert view["output_url"] is None  # no copy kept on the server
        wait_until(lambda: web_store.callbacks.get("e2e"), message="callback received")
        assert files_under(tmp_path / "work") == []
    [put] = web_store.puts["e2e-out.mp4"]
    assert put.headers["Content-Type"] == "video/mp4"
    output = tmp_path / "received.mp4"
    output.write_bytes(put.body)
    assert probe_video(output).codec == "h264"
    assert probe_audio(output).duration_s > 0
    [callback] = web_store.callbacks["e2e"]
    expected = "sha256=" + hmac.new(SECRET.encode(), callback.body, hashlib.sha256).hexdigest()
    assert callback.headers["X-MuseTalk-Signature"] == expected
    status = json.loads(callback.body)
    assert status["job_id"] == view["job_id"] and status["status"] == "succeeded"
    assert status["result"]["frames"] == result["frames"] > 0


def test_missing_source_fails_the_job_with_the_status(serve, web_store, short_audio):
    body = {"video_url": f"{web_store.base_url}/media/nothing.mp4?sig=x", "audio_url": web_store.serve_file("a404.wav", short_audio),
            "face_box": SMALL_FACE_BOX, "callback_url": web_store.callback_url("a404")}
    with serve(urls=url_settings()) as client:
        error = assert_error(client.post("/lipsync", json=body), 422, "source_http_error", "video_url", "HTTP 404", "/media/nothing.mp4")
        assert "sig=x" not in error["message"]
        wait_until(lambda: web_store.callbacks.get("a404"), message="callback of the failed job")
    assert json.loads(web_store.callbacks["a404"][0].body)["error"]["code"] == "source_http_error"


def test_unreachable_source(serve, short_audio, small_video):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    body = {"video_path": str(small_video), "audio_url": f"http://127.0.0.1:{port}/a.wav", "face_box": SMALL_FACE_BOX}
    with serve(urls=url_settings(connect_timeout_s=2)) as client:
        assert_error(client.post("/lipsync", json=body), 422, "source_unreachable", "audio_url", f"127.0.0.1:{port}")


def test_oversized_source_is_413(serve, web_store, small_video, short_audio, tmp_path):
    body = {"video_url": web_store.serve_file("big.mp4", small_video), "audio_path": str(short_audio), "face_box": SMALL_FACE_BOX}
    limit = small_video.stat().st_size - 1
    with serve(urls=url_settings(), limits={"max_upload_bytes": limit}) as client:
        assert_error(client.post("/lipsync", json=body), 413, "download_too_large", "video_url", str(limit))
        assert files_under(tmp_path / "work") == []


def test_source_that_is_not_media(serve, web_store, short_audio, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)
    body = {"video_url": web_store.serve_file("notes.mp4", text), "audio_path": str(short_audio), "face_box": SMALL_FACE_BOX}
    with serve(urls=url_settings()) as client:
        assert_error(client.post("/lipsync", json=body), 422, "not_a_video")


@pytest.mark.parametrize(
    ("allowed", "url", "named"),
    [
        ([], "http://127.0.0.1:1/a.mp4", "urls.allowed_hosts is empty"),
        (["example.com", "*.store.example"], "http://127.0.0.1:1/a.mp4", "'127.0.0.1' is not in urls.allowed_hosts"),
        (["127.0.0.1"], "ftp://127.0.0.1/a.mp4", "http:// or https://"),
    ],
)
def test_url_refused_at_submit(serve, short_audio, allowed, url, named):
    with serve(urls=UrlSettings(allowed_hosts=allowed)) as client:
        response = client.post("/jobs", json={"video_url": url, "audio_path": str(short_audio)})
        code = "invalid_url" if url.startswith("ftp") else "url_not_allowed"
        assert_error(response, 400, code, "video_url", named)
        assert client.get("/ready").json()["queue_depth"] == 0


def test_url_and_path_for_one_medium_is_400(serve, web_store, small_video, short_audio):
    body = {"video_path": str(small_video), "video_url": web_store.serve_file("both.mp4", small_video), "audio_path": str(short_audio)}
    with serve(urls=url_settings()) as client:
        assert_error(client.post("/jobs", json=body), 400, "invalid_option", "video_url", "not both")
        assert_error(client.post("/jobs", json={"video_path": str(small_video)}), 400, "invalid_option", "audio_url")


def test_output_put_retried_until_it_succeeds(serve, web_store, small_video, short_audio):
    web_store.fail_puts("retry.mp4", 503, 500)
    body = {"video_path": str(small_video), "audio_path": str(short_audio), "output_url": web_store.put_url("retry.mp4"),
            "face_box": SMALL_FACE_BOX}
    with serve(urls=url_settings()) as client:
        response = client.post("/lipsync", json=body)
        assert response.status_code == 200, response.text
    assert web_store.put_attempts["retry.mp4"] == 3
    assert len(web_store.puts["retry.mp4"]) == 1 and web_store.puts["retry.mp4"][0].body[4:8] == b"ftyp"


def test_output_put_gives_up(serve, web_store, small_video, short_audio):
    web_store.fail_puts("never.mp4", 503, 503, 503)
    body = {"video_path": str(small_video), "audio_path": str(short_audio), "output_url": web_store.put_url("never.mp4"),
            "face_box": SMALL_FACE_BOX}
    with serve(urls=url_settings(upload_attempts=3)) as client:
        assert_error(client.post("/lipsync", json=body), 502, "output_upload_failed", "HTTP 503")
    assert web_store.put_attempts["never.mp4"] == 3 and "never.mp4" not in web_store.puts
