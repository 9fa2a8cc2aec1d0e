"""A corpus of awkward inputs through a real server with input and output roots set.

Each bad input gets its 4xx with the right code; each awkward but valid one succeeds with a
correct output; after every request the server is still ready.
"""

from __future__ import annotations

import math
import os
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest

from musetalk_service.media.encode import even_size
from musetalk_service.media.probe import probe_audio, probe_video
from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import assert_error, files_under

ODD_NAME = "a b 'q' \"dq\"; rm -rf ~ $(x) ünï 日本"


def ffmpeg(exe: str, *args: str) -> None:
    subprocess.run([exe, "-v", "error", "-y", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ffmpeg_exe, make_video, make_audio, talking_head_video) -> dict[str, Path]:
    """The media, made once, all under the input root `root/in`."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "in"
    src.mkdir()
    (root / "out").mkdir()
    (root / "elsewhere").mkdir()
    head = make_video(0.4, 25, (128, 128))
    speech = make_audio(0.2)
    f = {}

    def path(name: str) -> Path:
        f[name.rsplit(".", 1)[0]] = src / name
        return src / name

    # Broken or wrong files.
    data = talking_head_video.read_bytes()
    path("truncated.mp4").write_bytes(data[: len(data) // 2])
    path("zero.mp4").write_bytes(b"")
    path("zero.wav").write_bytes(b"")
    path("text.wav").write_text("not audio\n" * 50)
    ffmpeg(ffmpeg_exe, "-f", "lavfi", "-i", "color=c=gray:s=64x64:d=1", "-frames:v", "0", "-c:v", "libx264", str(path("no_frames.mp4")))
    ffmpeg(ffmpeg_exe, "-f", "lavfi", "-i", "color=c=gray:s=1x1:d=0.4:r=25", "-c:v", "libx264", "-pix_fmt", "yuv444p", str(path("one_by_one.mp4")))
    ffmpeg(ffmpeg_exe, "-f", "lavfi", "-i", "color=c=gray:s=4096x2304:d=0.04:r=25", "-c:v", "libx264", "-preset", "ultrafast", str(path("huge.mp4")))
    ffmpeg(ffmpeg_exe, "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "0", "-c:a", "pcm_s16le", str(path("empty.wav")))
    # Awkward but valid.
    ffmpeg(ffmpeg_exe, "-i", str(head), "-vf", "scale=131:97", "-c:v", "libx264", "-pix_fmt", "yuv444p", str(path("odd.mp4")))
    ffmpeg(ffmpeg_exe, "-i", str(head), "-vf", "select='lt(mod(n\\,5)\\,3)'", "-fps_mode", "vfr", "-c:v", "libx264", str(path("vfr.mp4")))
    ffmpeg(ffmpeg_exe, "-i", str(head), "-vf", "scale=160:128", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(root / "upright.mp4"))
    ffmpeg(ffmpeg_exe, "-display_rotation:v:0", "90", "-i", str(root / "upright.mp4"), "-c", "copy", str(path("rotated.mp4")))
    ffmpeg(ffmpeg_exe, "-i", str(head), "-c:v", "libx264", "-pix_fmt", "yuv420p10le", str(path("ten_bit.mp4")))
    ffmpeg(ffmpeg_exe, "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "0.2", "-c:a", "pcm_s16le", str(path("silence.wav")))
    ffmpeg(ffmpeg_exe, "-i", str(speech), "-ar", "8000", "-ac", "1", str(path("8k_mono.wav")))
    ffmpeg(ffmpeg_exe, "-i", str(speech), "-ar", "48000", "-ac", "2", str(path("48k_stereo.wav")))
    path("head.mp4").write_bytes(head.read_bytes())
    path("speech.wav").write_bytes(speech.read_bytes())
    (src / f"{ODD_NAME}.mp4").write_bytes(head.read_bytes())
    (src / f"{ODD_NAME}.wav").write_bytes(speech.read_bytes())
    f["odd_name_video"], f["odd_name_audio"] = src / f"{ODD_NAME}.mp4", src / f"{ODD_NAME}.wav"
    (root / "elsewhere" / "secret.mp4").write_bytes(head.read_bytes())
    (src / "link_out.mp4").symlink_to(root / "elsewhere" / "secret.mp4")
    f["root"] = root
    return f


@pytest.fixture(scope="module")
def corpus_server(corpus, tiny_settings, tiny_pipeline, tmp_path_factory):
    from musetalk_service.api.app import create_app
    from tests.api.live import live_server

    root = corpus["root"]
    settings = tiny_settings.model_copy(update={
        "input_roots": [root / "in"], "output_roots": [root / "out"], "output_dir": root / "out" / "auto",
        "work_dir": tmp_path_factory.mktemp("corpus-work"),
    })
    app = create_app(settings, tiny_pipeline)
    with live_server(app) as client:
        client.app_service = app.state.service  # type: ignore[attr-defined]
        yield client


def lipsync(client, video: str, audio: str, output: str | None = None, **extra):
    body = {"video_path": video, "audio_path": audio, "face_box": SMALL_FACE_BOX, **extra}
    if output is not None:
        body["output_path"] = output
    return client.post("/lipsync", json=body)


BAD = [
    # case, video, audio, status, code
    ("truncated video", "truncated", "speech", 422, "not_a_video"),
    ("zero-byte video", "zero", "speech", 422, "not_a_video"),
    ("zero-byte audio", "head", "zero", 422, "bad_audio"),
    ("text as audio", "head", "text", 422, "bad_audio"),
    ("audio passed as video", "speech", "speech", 422, "no_video_stream"),
    ("video with no frames", "no_frames", "speech", 422, "no_video_stream"),
    ("1x1 video", "one_by_one", "speech", 422, "resolution_too_small"),
    ("very large resolution", "huge", "speech", 422, "resolution_too_large"),
    ("zero-length audio", "head", "empty", 422, "bad_audio"),
]


@pytest.mark.parametrize(("case", "video", "audio", "status", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_media_gets_its_4xx_and_the_server_stays_ready(corpus_server, corpus, case, video, audio, status, code):
    response = lipsync(corpus_server, str(corpus[video]), str(corpus[audio]))

    assert_error(response, status, code)
    assert corpus_server.get("/ready").status_code == 200


def test_face_box_outside_the_frame_is_400(corpus_server, corpus):
    response = lipsync(corpus_server, str(corpus["head"]), str(corpus["speech"]), face_box=[100, 100, 140, 140])

    assert_error(response, 400, "invalid_option", "face_box", "outside the 128x128 frame")


def test_paths_outside_the_roots_are_403(corpus_server, corpus):
    root = corpus["root"]
    inside = root / "in"
    cases = [
        ("video_path", lipsync(corpus_server, f"{inside}/../elsewhere/secret.mp4", str(corpus["speech"]))),
        ("video_path", lipsync(corpus_server, f"{inside}/../../../../../../etc/passwd", str(corpus["speech"]))),
        ("video_path", lipsync(corpus_server, "/etc/hostname", str(corpus["speech"]))),
        ("video_path", lipsync(corpus_server, str(inside / "link_out.mp4"), str(corpus["speech"]))),
        ("audio_path", lipsync(corpus_server, str(corpus["head"]), f"{inside}/../elsewhere/nope.wav")),
        ("output_path", lipsync(corpus_server, str(corpus["head"]), str(corpus["speech"]), f"{root}/out/../escape.mp4")),
        ("output_path", lipsync(corpus_server, str(corpus["head"]), str(corpus["speech"]), str(inside / "x.mp4"))),
        ("output_path", lipsync(corpus_server, str(corpus["head"]), str(corpus["speech"]), "/tmp/escape.mp4")),
    ]

    for field, response in cases:
        assert_error(response, 403, "path_not_allowed", field)
    assert "elsewhere" not in cases[3][1].json()["error"]["message"]  # a symlink's target is never shown
    assert not (root / "escape.mp4").exists() and not (inside / "x.mp4").exists()
    assert corpus_server.get("/ready").status_code == 200


GOOD = [
    # case, video, audio, expected output size (None: the input's, rounded to even), fps
    ("odd-sized video", "odd", "speech"),
    ("variable frame rate", "vfr", "speech"),
    ("rotation metadata", "rotated", "speech"),
    ("10-bit video", "ten_bit", "speech"),
    ("silent audio", "head", "silence"),
    ("8 kHz mono audio", "head", "8k_mono"),
    ("48 kHz stereo audio", "head", "48k_stereo"),
    ("names with spaces, quotes, semicolons, non-ASCII", "odd_name_video", "odd_name_audio"),
]


@pytest.mark.parametrize(("case", "video", "audio"), GOOD, ids=[g[0] for g in GOOD])
def test_awkward_valid_media_succeeds_with_a_correct_output(corpus_server, corpus, case, video, audio):
    output = corpus["root"] / "out" / f"{case}.mp4"
    source = probe_video(corpus[video])

    response = lipsync(corpus_server, str(corpus[video]), str(corpus[audio]), str(output))

    assert response.status_code == 200, response.text
    result = response.json()
    made = probe_video(output)
    sound = probe_audio(output)
    fps = Fraction(source.fps)
    assert result["output_path"] == str(output)
    assert result["frames"] == made.frame_count == math.floor(0.2 * fps)
    assert Fraction(made.fps) == fps
    # As displayed (rotation applied), odd sides cropped to even.
    assert (made.width, made.height) == even_size(source.width, source.height)
    assert sound.duration_s == pytest.approx(0.2, abs=0.05)
    assert corpus_server.get("/ready").status_code == 200


def test_rotated_video_comes_out_upright_and_portrait(corpus):
    made = probe_video(corpus["root"] / "out" / "rotation metadata.mp4")

    assert (made.width, made.height, made.rotation) == (128, 160, 0)


def test_odd_names_upload_through_multipart(corpus_server, corpus):
    with open(corpus["odd_name_video"], "rb") as video, open(corpus["speech"], "rb") as audio:
        response = corpus_server.post(
            "/lipsync",
            files={"video": (f"{ODD_NAME}.mp4", video, "video/mp4"), "audio": (f"{ODD_NAME}.wav", audio, "audio/wav")},
            data={"face_box": str(SMALL_FACE_BOX)},
        )

    assert response.status_code == 200, response.text
    output = Path(response.json()["output_path"])
    assert output.parent == corpus["root"] / "out" / "auto"
    assert output.name.isascii() and ";" not in output.name and " " not in output.name
    assert probe_video(output).frame_count == 5


def test_nothing_is_left_in_the_work_folders(corpus_server, tiny_settings, corpus):
    service = corpus_server.app_service if hasattr(corpus_server, "app_service") else None
    work_dirs = [Path(tiny_settings.work_dir)] + ([service.work_root] if service else [])
    assert [p for p in files_under(*work_dirs) if p.name.startswith("musetalk")] == []
    assert [p for p in os.listdir(corpus["root"] / "out") if p.endswith(".part")] == []
