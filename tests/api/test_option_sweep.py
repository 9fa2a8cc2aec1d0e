"""The whole request surface at its extremes, through one real server: every caller's mistake is a
4xx with the code that names it, and no job is created (the job counters of /metrics stay as they
were, and no file appears under the work or output folder).

The options are enumerated from the code (`LipsyncDefaults`, `LipsyncBody`, `AvatarBody`), so an
option added later is swept too; the values are each one's extremes: zero, negative, the smallest
and largest floats, infinities and NaN (as strings and as JSON literals), bools and floats where
ints are wanted, wrong types, empty, huge and odd strings (NUL, lone surrogates, over-long names).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import annotated_types
import httpx
import pytest

from musetalk_service.api.app import create_app
from musetalk_service.api.schemas import AvatarBody, LipsyncBody
from musetalk_service.pipeline.runner import LipsyncPipeline
from musetalk_service.settings import LipsyncDefaults, Settings, UrlSettings
from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import files_under, metrics
from tests.api.live import live_server


class Raw(str):
    """A value written into the JSON text as it is (NaN, Infinity, 1e999 are no JSON `json.dumps` writes)."""


class Case(NamedTuple):
    route: str
    field: str | None
    """The body field set to `value` (None: `value` is the whole body, bytes)."""
    value: Any
    status: int
    code: str
    drop: tuple[str, ...] = ()
    """Base fields left out (a URL field replaces its path field)."""


# --- the options and their extremes -----------------------------------------------------------------

INT_OPTIONS = [name for name, f in LipsyncDefaults.model_fields.items() if f.annotation is int]
LITERAL_OPTIONS = [name for name, f in LipsyncDefaults.model_fields.items() if f.annotation is not int]
PATH_FIELDS = ["video_path", "audio_path", "output_path"]
URL_FIELDS = ["video_url", "audio_url", "output_url", "callback_url"]
WRONG_TYPES = [True, False, [], {}, [1], {"a": 1}]
BAD_NUMBERS = [
    5e-324, 0.5, 1e308, -1e308, 10**30, -(10**30), "inf", "nan", "Infinity", "", " ", "5x", "0x10",
    Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), *WRONG_TYPES,
]  # fmt: skip
BAD_FPS = [
    0, -1, 5e-324, 0.0001, 0.99, 120.5, 121, 1e308, -1e308, "0/1", "1/0", "30000/0", "-25", "25.0.0", "1e3",
    "inf", "nan", "", " ", "x" * 100, "\u0662\u0665", Raw("NaN"), Raw("Infinity"), Raw("1e999"), *WRONG_TYPES,
]  # fmt: skip
BAD_BOXES = [
    [0, 0, 1, 1], [5, 5, 5, 5], [10, 10, 5, 5], [1, 2, 3], [1, 2, 3, 4, 5], [], [-1, 0, 10, 10], [0.5, 0, 10, 10],
    [True, 0, 10, 10], [None, 0, 10, 10], [0, 0, 10**30, 10**30], [0, 0, 1e308, 1e308], [0, 0, 129, 128],
    "0,0,10,10", {"x1": 0}, True, 5,
]  # fmt: skip
BAD_WORDS = ["", "JAW", "jaw ", "a\x00b", "\ud800", "x" * 10_000, 5, *WRONG_TYPES]
ODD_PATHS = [
    ("", "invalid_path"), ("a\x00b", "invalid_path"), ("\ud800", "invalid_path"), ("/" + "a" * 300, "invalid_path"),
    ("/a" * 2100, "invalid_path"), ("x" * 60_000, "invalid_path"), *((v, "invalid_option") for v in [5, *WRONG_TYPES]),
]  # fmt: skip
BAD_URLS = [
    ("", "invalid_url"), ("a\x00b", "invalid_url"), ("\ud800", "invalid_url"), ("ftp://127.0.0.1/x", "invalid_url"),
    ("file:///etc/passwd", "invalid_url"), ("http://", "invalid_url"), ("http://[::1/", "invalid_url"),
    ("http://127.0.0.1:99999/x", "invalid_url"), ("http://127.0.0.1/\x00", "invalid_url"),
    ("http://127.0.0.1/a\nb", "invalid_url"), ("..", "invalid_url"), ("http://example.com/v.mp4", "url_not_allowed"),
    *((v, "invalid_option") for v in [5, *WRONG_TYPES]),
]  # fmt: skip


def _bounds(name: str) -> tuple[int, int]:
    meta = LipsyncDefaults.model_fields[name].metadata
    low = next(m.ge for m in meta if isinstance(m, annotated_types.Ge))
    high = next(m.le for m in meta if isinstance(m, annotated_types.Le))
    return low, high


def _lipsync_cases() -> Iterator[Case]:
    for route in ("/jobs", "/lipsync"):
        for name in INT_OPTIONS:
            low, high = _bounds(name)
            for value in [low - 1, high + 1, *BAD_NUMBERS]:
                yield Case(route, name, value, 400, "invalid_option")
        for value in BAD_FPS:
            yield Case(route, "fps", value, 400, "invalid_option")
    for value in BAD_BOXES:
        yield Case("/jobs", "face_box", value, 400, "invalid_option")
    for name in LITERAL_OPTIONS:
        for value in BAD_WORDS:
            yield Case("/jobs", name, value, 400, "invalid_option")
    for name in PATH_FIELDS:
        for value, code in ODD_PATHS:
            yield Case("/jobs", name, value, 400, code)
        missing = "output_not_writable" if name == "output_path" else "file_not_found"
        for value in ["..", "/nonexistent/x.mp4", "/dev/null", "/"]:
            yield Case("/jobs", name, value, 400, missing)
    for value in ["", "a\x00b", "\ud800", "..", "x" * 60_000, "0" * 32]:
        yield Case("/jobs", "avatar_id", value, 404, "avatar_not_found", drop=("video_path", "face_box"))
    for value in [5, *WRONG_TYPES]:
        yield Case("/jobs", "avatar_id", value, 400, "invalid_option", drop=("video_path", "face_box"))
    for name in URL_FIELDS:
        replaces = {"video_url": ("video_path",), "audio_url": ("audio_path",)}.get(name, ())
        for value, code in BAD_URLS:
            yield Case("/jobs", name, value, 400, code, drop=replaces)
    for name in ["nope", "Face_Box", "", "\x00", "x" * 1000]:
        yield Case("/jobs", name, 1, 400, "invalid_option")


def _avatar_cases() -> Iterator[Case]:
    for name in AvatarBody.model_fields:
        if name in INT_OPTIONS:
            low, high = _bounds(name)
            for value in [low - 1, high + 1, 0.5, "inf", Raw("NaN"), True, []]:
                yield Case("/avatars", name, value, 400, "invalid_option", drop=("audio_path",))
    for value in [0, 5e-324, 1e308, "1/0", True, [0, 0, 1, 1]]:
        yield Case("/avatars", "fps", value, 400, "invalid_option", drop=("audio_path",))
    for value in [[0, 0, 1, 1], [0, 0, 129, 128], [True, 0, 10, 10]]:
        yield Case("/avatars", "face_box", value, 400, "invalid_option", drop=("audio_path",))
    for value, code in ODD_PATHS:
        yield Case("/avatars", "video_path", value, 400, code, drop=("audio_path",))
    # Lip-sync options an avatar doesn't take, and an unknown one.
    lipsync_only = sorted(set(LipsyncBody.model_fields) - set(AvatarBody.model_fields) - {"audio_path"})
    for name in [*lipsync_only, "nope"]:
        yield Case("/avatars", name, None if name.endswith("_url") else 1, 400, "invalid_option", drop=("audio_path",))


BODIES = [
    (b"", "invalid_request"), (b"[]", "invalid_request"), (b"null", "invalid_request"), (b"123", "invalid_request"),
    (b'"s"', "invalid_request"), (b"{", "invalid_request"), (b"\xff\xfe{}", "invalid_request"),
    (b"[" * 60_000, "invalid_request"), (b'{"fps": ' + b"[" * 60_000, "invalid_request"),
    (b'{"batch_size": ' + b"1" * 5000 + b"}", "invalid_request"),
]  # fmt: skip

CASES = [*_lipsync_cases(), *_avatar_cases()]


def _case_id(case: Case) -> str:
    value = case.value if not isinstance(case.value, str) or len(case.value) < 24 else f"{case.value[:8]}...x{len(case.value)}"
    return f"{case.route}:{case.field}={value!r}"


# --- one server for the sweep -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sweep")
    (root / "work").mkdir()
    return root / "work", root / "outputs"


@pytest.fixture(scope="module")
def sweep_client(tiny_settings: Settings, tiny_pipeline: LipsyncPipeline, folders: tuple[Path, Path]) -> Iterator[httpx.Client]:
    work, outputs = folders
    urls = UrlSettings(allowed_hosts=["127.0.0.1"], connect_timeout_s=1)
    settings = tiny_settings.model_copy(update={"work_dir": work, "output_dir": outputs, "urls": urls})
    with live_server(create_app(settings, tiny_pipeline)) as client:
        yield client


@pytest.fixture(scope="module")
def base(small_video: Path, short_audio: Path) -> dict[str, Any]:
    """A body that works: each case changes one field of it."""
    return {"video_path": str(small_video), "audio_path": str(short_audio), "face_box": SMALL_FACE_BOX}


def _jobs_seen(client: httpx.Client) -> float:
    """Jobs queued, running or finished: any job a request created shows in one of them."""
    sampled = metrics(client)
    finished = sum(v for (name, _), v in sampled.items() if name == "musetalk_jobs_total")
    return sampled[("musetalk_queue_depth", ())] + sampled[("musetalk_jobs_running", ())] + finished


@pytest.fixture
def no_job(sweep_client: httpx.Client, folders: tuple[Path, Path]) -> Iterator[None]:
    """The test's requests create no job and leave no file behind."""
    before = _jobs_seen(sweep_client)
    yield
    assert _jobs_seen(sweep_client) == before
    assert files_under(*folders) == []


def _body_text(body: dict[str, Any], field: str, value: Any) -> bytes:
    written = value if isinstance(value, Raw) else json.dumps(value)
    text = json.dumps(body)
    return (text[:-1] + (", " if body else "") + f"{json.dumps(field)}: {written}}}").encode()


def _assert_refused(response: httpx.Response, status: int, code: str, named: str | None = None) -> None:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == code, error
    if named:
        assert named in error["message"], error


# --- the sweep -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_json_option_at_an_extreme_is_refused_before_any_work(sweep_client, base, no_job, case: Case):
    body = {k: v for k, v in base.items() if k not in case.drop and k != case.field}
    response = sweep_client.post(case.route, content=_body_text(body, case.field, case.value),
                                 headers={"Content-Type": "application/json"})

    # A message names the field it blames (unknown names are shown only when printable).
    named = case.field if case.field and case.field.isprintable() and len(case.field) < 100 else None
    _assert_refused(response, case.status, case.code, named if case.code != "avatar_not_found" else "avatar_id")


@pytest.mark.parametrize(("body", "code"), BODIES, ids=lambda v: repr(v[:24]) if isinstance(v, bytes) else v)
@pytest.mark.parametrize("route", ["/jobs", "/lipsync", "/avatars"])
def test_a_body_that_is_no_json_object_is_refused(sweep_client, no_job, route, body, code):
    response = sweep_client.post(route, content=body, headers={"Content-Type": "application/json"})

    _assert_refused(response, 400, code)


def test_a_body_over_the_json_limit_is_413(sweep_client, base, no_job):
    response = sweep_client.post("/jobs", json={**base, "output_path": "x" * (1 << 20)})

    _assert_refused(response, 413, "body_too_large")


@pytest.mark.parametrize(
    ("changes", "drop", "code", "named"),
    [
        ({"avatar_id": "0" * 32}, (), "invalid_option", "video_path"),  # both
        ({}, ("video_path",), "invalid_option", "video_path"),  # neither
        ({}, ("audio_path",), "invalid_option", "audio_path"),
        ({"avatar_id": "0" * 32, "fps": 25}, ("video_path", "face_box"), "invalid_option", "fps"),
        ({"video_url": "http://127.0.0.1/v.mp4"}, (), "invalid_option", "video_url"),  # and video_path
        ({"audio_url": "http://127.0.0.1/a.wav"}, (), "invalid_option", "audio_url"),
    ],
)
def test_fields_that_exclude_each_other(sweep_client, base, no_job, changes, drop, code, named):
    body = {**{k: v for k, v in base.items() if k not in drop}, **changes}

    _assert_refused(sweep_client.post("/jobs", json=body), 400, code, named)


def test_values_valid_alone_but_not_for_these_media(sweep_client, base, make_audio, no_job):
    # 1 fps gives the 0.4 s video no frame; 1.5 fps gives the 0.2 s track none; 0.02 s is no frame at 25 fps.
    _assert_refused(sweep_client.post("/jobs", json={**base, "fps": 1}), 400, "invalid_option", "fps")
    _assert_refused(sweep_client.post("/avatars", json={"video_path": base["video_path"], "fps": 1}), 400, "invalid_option", "fps")
    _assert_refused(sweep_client.post("/jobs", json={**base, "fps": 1.5}), 422, "bad_audio", "audio_path")
    _assert_refused(sweep_client.post("/jobs", json={**base, "audio_path": str(make_audio(0.02))}), 422, "bad_audio")
    _assert_refused(sweep_client.post("/jobs", json={**base, "audio_path": str(make_audio(0))}), 422, "bad_audio")


# --- multipart --------------------------------------------------------------------------------------


def _form_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _parsed(value: Any) -> Any:
    """A form field's value as the server reads it: JSON where it parses, else the text."""
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return value


MULTIPART_CASES = [
    *((name, value) for name in INT_OPTIONS for value in [_bounds(name)[1] + 1, 0.5, "NaN", "true", "[[1]]"]),
    *(("fps", value) for value in ["0", "5e-324", "1e308", "Infinity", "true", "1/0", ""]),
    ("face_box", "[0, 0, 1, 1]"), ("face_box", "0,0,10,10"), ("parsing_mode", "JAW"), ("silence", ""),
    ("nope", "1"), ("output_path", ""), ("video_path", "/a" * 2100),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value"), MULTIPART_CASES)
@pytest.mark.parametrize("as_options", [False, True], ids=["field", "options"])
def test_multipart_option_at_an_extreme_is_refused(sweep_client, base, short_audio, no_job, name, value, as_options):
    given = {"video_path": base["video_path"], "face_box": base["face_box"]}
    if as_options:
        fields = {"options": json.dumps({**given, name: _parsed(value)})}
    else:
        fields = {**{k: _form_value(v) for k, v in given.items()}, name: _form_value(value)}
    files = {"audio": ("a.wav", short_audio.read_bytes(), "audio/wav")}
    response = sweep_client.post("/jobs", files=files, data=fields)

    code = "invalid_path" if name.endswith("_path") else "invalid_option"
    _assert_refused(response, 400, code, name)


@pytest.mark.parametrize(
    ("fields", "files", "status", "code"),
    [
        ({"options": "[" * 60_000}, {}, 400, "invalid_request"),
        ({"face_box": "[" * 60_000}, {}, 400, "invalid_request"),
        ({"options": "[]"}, {}, 400, "invalid_option"),
        ({"options": "{nope"}, {}, 400, "invalid_option"),
        ({"batch_size": "x" * (1 << 20)}, {}, 400, "invalid_upload"),  # over the field limit
        ({"video_path": b"\xff\xfe"}, {}, 400, "invalid_upload"),  # not UTF-8
        ({}, {"picture": ("p.png", b"1")}, 400, "invalid_upload"),
        ({"video_path": "/x.mp4"}, {"video": ("v.mp4", b"1")}, 400, "invalid_option"),
        ({}, {"audio": ("a.wav", b"")}, 422, "bad_audio"),  # an empty upload
    ],
    ids=["nested-options", "nested-field", "options-array", "options-not-json", "huge-field", "not-utf8",
         "unknown-file", "path-and-upload", "empty-upload"],
)
def test_multipart_body_mistakes(sweep_client, base, short_audio, no_job, fields, files, status, code):
    form = {"video_path": base["video_path"], "face_box": json.dumps(base["face_box"]), **fields}
    parts = {"audio": ("a.wav", short_audio.read_bytes(), "audio/wav"), **files}
    if "video" in files:
        del form["face_box"]
    response = sweep_client.post("/jobs", files=parts, data=form)

    _assert_refused(response, status, code)


# --- path parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ident", ["0" * 32, "a" * 5000, "%00", "%ff", "..%2e", "\u00e9"])
def test_unknown_job_and_avatar_ids_are_404(sweep_client, no_job, ident):
    for method, path, code in [
        ("GET", f"/jobs/{ident}", "job_not_found"), ("DELETE", f"/jobs/{ident}", "job_not_found"),
        ("GET", f"/jobs/{ident}/output", "job_not_found"),
        ("GET", f"/avatars/{ident}", "avatar_not_found"), ("DELETE", f"/avatars/{ident}", "avatar_not_found"),
    ]:  # fmt: skip
        _assert_refused(sweep_client.request(method, path), 404, code)


def test_the_server_is_still_ready_after_the_sweep(sweep_client):
    assert sweep_client.get("/ready").status_code == 200
    assert metrics(sweep_client).get(("musetalk_requests_total", (("outcome", "internal_error"), ("route", "/jobs"))), 0) == 0
