"""POST /lipsync and GET /health through a real server: the contract, every bad-input class, the GPU lock."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import httpx
import pytest

from musetalk_service import errors
from musetalk_service.api.app import create_app
from musetalk_service.contract import PHASES
from tests.api.live import FACE_BOX, live_server, wait_ready


def post(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/lipsync", json=body)


def assert_error(response: httpx.Response, status: int, code: str, *named: str) -> None:
    """The response is `{error: {code, message}}` with this status, and the message names each of `named`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for text in named:
        assert text in error["message"], error


def test_health_reports_device_weights_and_encoder(client):
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok", "device": "cpu", "weights": "random", "encoder": "libx264", "models_loaded": True,
    }


def test_app_loads_its_pipeline_in_the_background_when_none_is_given(tiny_settings):
    with live_server(create_app(tiny_settings)) as client:
        # Alive at once (liveness), not ready until the models are loaded and warmed.
        first = client.get("/health").json()
        first_ready = client.get("/ready")
        ready = wait_ready(client)
        health = client.get("/health").json()

    assert first["status"] == "ok"
    if not first["models_loaded"]:
        assert first_ready.status_code == 503 and first_ready.json()["error"]["code"] == "not_ready"
        assert "loading" in first_ready.json()["error"]["message"]
    assert ready.status_code == 200
    assert health["models_loaded"] is True
    assert health["weights"] == "random"


def test_lipsync_writes_the_output_and_returns_its_facts(client, talking_head_video, make_audio, tmp_path):
    output = tmp_path / "out.mp4"

    response = post(
        client, video_path=str(talking_head_video), audio_path=str(make_audio(1.0)), output_path=str(output),
        face_box=FACE_BOX, batch_size=8,
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output_path"] == str(output)
    assert output.is_file() and output.stat().st_size > 0
    assert body["frames"] == 25  # 1 s of audio at the video's 25 fps
    assert body["fps"] == 25.0
    assert body["duration_s"] == pytest.approx(1.0, abs=0.05)
    assert body["weights"] == "random"
    assert body["encoder"] == "libx264"
    assert set(PHASES) | {"total"} <= set(body["timings"])
    assert body["fallbacks"] >= 0 and body["frames_without_face"] == 0


def test_output_path_defaults_to_the_output_dir(client, tiny_settings, talking_head_video, make_audio):
    audio = make_audio(0.5)

    response = post(client, video_path=str(talking_head_video), audio_path=str(audio), face_box=FACE_BOX)

    assert response.status_code == 200, response.text
    output = Path(response.json()["output_path"])
    assert output.parent == tiny_settings.output_dir
    assert output.name.startswith(f"{talking_head_video.stem}_{audio.stem}_") and output.suffix == ".mp4"
    assert output.is_file()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "notes.txt"
    path.write_text("not a video\n" * 100)
    return path


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("missing_video", 400, "file_not_found"),
        ("missing_audio", 400, "file_not_found"),
        ("directory_as_video", 400, "file_not_found"),
        ("text_as_video", errors.NotAVideo.status, "not_a_video"),
        ("audio_as_video", errors.NoVideoStream.status, "no_video_stream"),
        ("silent_video_as_audio", errors.BadAudio.status, "bad_audio"),
        ("output_dir_missing", 400, "output_not_writable"),
        ("output_is_a_directory", 400, "output_not_writable"),
    ],
)
def test_bad_input_gets_its_4xx_naming_the_problem(
    client, case, status, code, talking_head_video, speech_wav, text_file, tmp_path
):
    body = {"video_path": str(talking_head_video), "audio_path": str(speech_wav),
            "output_path": str(tmp_path / "out.mp4"), "face_box": FACE_BOX}
    named = {
        "missing_video": ("video_path", str(tmp_path / "nope.mp4")),
        "missing_audio": ("audio_path", str(tmp_path / "nope.wav")),
        "directory_as_video": ("video_path", str(tmp_path)),
        "text_as_video": ("video_path", str(text_file)),
        "audio_as_video": ("video_path", str(speech_wav)),
        "silent_video_as_audio": ("audio_path", str(talking_head_video)),
        "output_dir_missing": ("output_path", str(tmp_path / "no-such-dir" / "out.mp4")),
        "output_is_a_directory": ("output_path", str(tmp_path)),
    }
    field, value = named[case]
    body[field] = value

    response = post(client, **body)

    # The pipeline's own messages name the file; the up-front checks also name the field.
    assert_error(response, status, code, Path(value).name)
    if code in ("file_not_found", "output_not_writable"):
        assert field in response.json()["error"]["message"]
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_unwritable_output_dir_is_refused(client, talking_head_video, speech_wav, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)

    response = post(client, video_path=str(talking_head_video), audio_path=str(speech_wav),
                    output_path=str(locked / "out.mp4"))

    assert_error(response, 400, "output_not_writable", "output_path", str(locked))


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ({"batch_size": -1}, ("batch_size", "greater than or equal to 1")),
        ({"batch_size": 1000}, ("batch_size", "less than or equal to 256")),
        ({"parsing_mode": "lips"}, ("parsing_mode", "'raw', 'jaw' or 'neck'")),
        ({"face_box": [100, 10, 50, 90]}, ("face_box", "x2 > x1")),
        ({"face_box": [-1, 10, 50, 90]}, ("face_box[0]", "greater than or equal to 0")),
        ({"face_box": [1, 2, 3]}, ("face_box", "Field required")),
        ({"face_box": [10, 10, 11, 11]}, ("face_box", "[10, 10, 11, 11]", "at least 2 px")),
        ({"fps": 0}, ("fps", "between 1 and 120")),
        ({"fps": 0.0001}, ("fps", "between 1 and 120")),
        ({"mask_every": "often"}, ("mask_every", "integer")),
        ({"lips": True}, ("lips", "Extra inputs are not permitted")),
    ],
)
def test_bad_option_values_are_400_invalid_option(client, option, named, talking_head_video, speech_wav):
    response = post(client, video_path=str(talking_head_video), audio_path=str(speech_wav), **option)

    assert_error(response, 400, "invalid_option", *named)


def test_missing_required_field_is_400_invalid_option(client, speech_wav, talking_head_video):
    assert_error(post(client, audio_path=str(speech_wav)), 400, "invalid_option", "video_path", "avatar_id")
    assert_error(post(client, video_path=str(talking_head_video)), 400, "invalid_option", "audio_path", "audio_url")


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b'{"video_path": "a.mp4", ', "not valid JSON"),
        (b'["a.mp4", "b.wav"]', "JSON object"),
        (b"[" * 60_000, "nested too deeply"),
        (b'{"face_box": ' + b"[" * 60_000, "nested too deeply"),
    ],
)
def test_malformed_body_is_400_invalid_request(client, content, named):
    response = client.post("/lipsync", content=content, headers={"content-type": "application/json"})

    assert_error(response, 400, "invalid_request", named)


def test_unknown_route_has_the_same_error_shape(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/lipsync"), 405, "method_not_allowed")


class RecordingPipeline:
    """The real pipeline, recording how many runs overlap; `fail_with` makes every run raise it instead."""

    def __init__(self, pipeline, fail_with: Exception | None = None):
        self.pipeline = pipeline
        self.fail_with = fail_with
        self.runs = 0
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def health(self) -> dict:
        return self.pipeline.health()

    def run(self, request, progress=None, cancel=None):
        with self._lock:
            self.runs += 1
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            if self.fail_with is not None:
                raise self.fail_with
            return self.pipeline.run(request, progress, cancel)
        finally:
            with self._lock:
                self.active -= 1


def test_concurrent_requests_take_turns_and_both_succeed(tiny_settings, tiny_pipeline, talking_head_video, make_audio, tmp_path):
    pipeline = RecordingPipeline(tiny_pipeline)
    audio = make_audio(0.5)
    responses: dict[int, httpx.Response] = {}

    with live_server(create_app(tiny_settings, pipeline)) as client:

        def request(i: int) -> None:
            responses[i] = post(client, video_path=str(talking_head_video), audio_path=str(audio),
                                output_path=str(tmp_path / f"out{i}.mp4"), face_box=FACE_BOX)

        threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert [responses[i].status_code for i in range(2)] == [200, 200], [r.text for r in responses.values()]
    assert (tmp_path / "out0.mp4").is_file() and (tmp_path / "out1.mp4").is_file()
    assert pipeline.runs == 2
    assert pipeline.most_active == 1


def test_unexpected_failure_is_500_without_its_details(tiny_settings, tiny_pipeline, talking_head_video, speech_wav, tmp_path):
    pipeline = RecordingPipeline(tiny_pipeline, fail_with=RuntimeError("boom at /secret/path token=hunter2"))

    with live_server(create_app(tiny_settings, pipeline)) as client:
        response = post(client, video_path=str(talking_head_video), audio_path=str(speech_wav),
                        output_path=str(tmp_path / "out.mp4"))
        health = client.get("/health")

    assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "hunter2" not in response.text
    assert health.status_code == 200  # the server goes on


def test_openapi_documents_every_route_and_both_body_kinds(client):
    spec = client.get("/openapi.json").json()

    assert {"/health", "/ready", "/metrics", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/output", "/lipsync",
            "/avatars", "/avatars/{avatar_id}"} <= set(spec["paths"])
    for path in ("/jobs", "/lipsync", "/avatars"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert {"application/json", "multipart/form-data"} <= set(content)
        ref = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert "audio_path" in spec["components"]["schemas"][ref]["properties"] or path == "/avatars"
        assert "video_path" in spec["components"]["schemas"][ref]["properties"]
    listing = spec["paths"]["/jobs"]["get"]
    assert listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobList")
    assert {p["name"] for p in listing["parameters"]} == {"status", "limit"}
    # A bad parameter is 400 invalid_option (ErrorResponse), never FastAPI's 422 HTTPValidationError.
    for operations in spec["paths"].values():
        for operation in operations.values():
            assert "HTTPValidationError" not in str(operation["responses"])


def test_docs_page_loads_every_asset_from_the_service_itself(client):
    # /docs must work on a host with no internet: each script, style sheet and icon it names is
    # served by the app (no CDN), and the page points Swagger UI at the app's own document.
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    urls = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text) + re.findall(r"""url: *['"]([^'"]+)['"]""", page.text)
    assert "/openapi.json" in urls
    assets = [url for url in urls if url != "/openapi.json"]
    assert {url.rsplit("/", 1)[1] for url in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for url in urls:
        assert url.startswith("/"), f"/docs names an off-host URL: {url}"
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert "SwaggerUIBundle" in client.get([u for u in assets if u.endswith(".js")][0]).text


def test_the_smallest_face_box_allowed_runs_to_the_end(client, talking_head_video, make_audio):
    # The bound the schema enforces is the real one: a box whose longer side is 2 px blends without error.
    response = post(client, video_path=str(talking_head_video), audio_path=str(make_audio(0.08)), face_box=[60, 60, 62, 61])

    assert response.status_code == 200, response.text
