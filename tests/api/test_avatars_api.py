"""Avatars as a resource: prepare (path or upload), list, use instead of a video, delete."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.conftest import SMALL_FACE_BOX
from tests.api.helpers import assert_error, files_under, metric


@pytest.fixture(scope="module")
def still_video(make_video) -> Path:
    """A clip of its own (no head motion): its avatar is no other test's."""
    return make_video(0.4, 25, (128, 128), motion=False)


def test_prepare_list_use_and_delete_an_avatar(serve, still_video, short_audio):
    with serve() as client:
        created = client.post("/avatars", json={"video_path": str(still_video), "face_box": SMALL_FACE_BOX})
        avatar_id = created.json()["avatar_id"]
        again = client.post("/avatars", json={"video_path": str(still_video), "face_box": SMALL_FACE_BOX})
        listed = client.get("/avatars").json()["avatars"]
        one = client.get(f"/avatars/{avatar_id}")
        hits_before = metric(client, "musetalk_avatar_cache_hits_total")
        used = client.post("/lipsync", json={"avatar_id": avatar_id, "audio_path": str(short_audio)})
        hits_after = metric(client, "musetalk_avatar_cache_hits_total")
        job = client.get(f"/jobs/{created.json()['job_id']}").json()
        deleted = client.delete(f"/avatars/{avatar_id}")
        gone = client.get(f"/avatars/{avatar_id}")
        used_after = client.post("/lipsync", json={"avatar_id": avatar_id, "audio_path": str(short_audio)})
        listed_after = client.get("/avatars").json()["avatars"]

    assert created.status_code == 201, created.text
    avatar = created.json()
    assert len(avatar_id) == 32
    assert (avatar["frame_count"], avatar["fps"], avatar["width"], avatar["height"], avatar["faces"]) == (10, "25/1", 128, 128, 10)
    assert avatar["video"] == still_video.name  # the file name, not the server path
    assert again.json()["avatar_id"] == avatar_id  # same content and options: the same avatar
    assert avatar_id in [a["avatar_id"] for a in listed]
    assert one.status_code == 200 and one.json()["avatar_id"] == avatar_id
    assert used.status_code == 200, used.text
    assert used.json()["avatar_id"] == avatar_id and used.json()["frames"] == 5
    assert hits_after > hits_before
    assert job["status"] == "succeeded" and job["result"]["avatar_id"] == avatar_id and job["output_url"] is None
    assert deleted.status_code == 200 and deleted.json() == {"avatar_id": avatar_id, "deleted": True}
    assert_error(gone, 404, "avatar_not_found")
    assert_error(used_after, 404, "avatar_not_found", avatar_id)
    assert avatar_id not in [a["avatar_id"] for a in listed_after]


def test_an_uploaded_avatar_keeps_its_video_until_deleted(serve, make_video, short_audio, tmp_path):
    video = make_video(0.4, 20, (128, 128), motion=False)
    kept = tmp_path / "work" / "musetalk-avatar-videos"
    with serve() as client:
        created = client.post(
            "/avatars", files={"video": ("my clip.mp4", video.read_bytes(), "video/mp4")},
            data={"face_box": str(SMALL_FACE_BOX)},
        )
        avatar_id = created.json()["avatar_id"]
        stored = files_under(kept)
        used = client.post("/lipsync", json={"avatar_id": avatar_id, "audio_path": str(short_audio)})
        client.delete(f"/avatars/{avatar_id}")
        after = files_under(tmp_path / "work")

    assert created.status_code == 201, created.text
    assert created.json()["fps"] == "20/1"
    assert len(stored) == 1 and stored[0].suffix == ".mp4"  # outside the upload folder, which is gone
    assert used.status_code == 200, used.text
    assert used.json()["frames"] == 4  # 0.2 s at the avatar's 20 fps
    assert after == []


@pytest.mark.parametrize(
    ("body", "status", "code", "named"),
    [
        ({"avatar_id": "0" * 32}, 404, "avatar_not_found", ("POST /avatars",)),
        ({"avatar_id": "../../etc/passwd"}, 404, "avatar_not_found", ()),
        ({"avatar_id": "0" * 32, "fps": 30}, 400, "invalid_option", ("fps", "avatar")),
        ({"avatar_id": "0" * 32, "video_path": "/x.mp4"}, 400, "invalid_option", ("video_path", "avatar_id")),
    ],
)
def test_bad_avatar_requests(serve, short_audio, body, status, code, named):
    with serve() as client:
        response = client.post("/jobs", json={"audio_path": str(short_audio), **body})

    assert_error(response, status, code, *named)


def test_avatar_of_a_bad_video_is_its_4xx(serve, short_audio, small_video, tmp_path):
    with serve() as client:
        missing = client.post("/avatars", json={"video_path": str(tmp_path / "nope.mp4")})
        audio = client.post("/avatars", json={"video_path": str(short_audio)})
        outside = client.post("/avatars", json={"video_path": str(small_video), "face_box": [100, 100, 200, 200]})
        unknown = client.delete("/avatars/" + "f" * 32)

    assert_error(missing, 400, "file_not_found", "video_path")
    assert_error(audio, 422, "no_video_stream")
    assert_error(outside, 400, "invalid_option", "face_box", "[100, 100, 200, 200]", "128x128")
    assert_error(unknown, 404, "avatar_not_found")
