"""PathPolicy: inputs only under input roots, outputs only under output roots, symlinks resolved."""

from __future__ import annotations

import os

import pytest

from musetalk_service.api.paths import PathNotAllowed, PathPolicy
from musetalk_service.errors import ServiceError

ODD_NAME = "a b 'q' \"dq\"; rm -rf ~ $(x) ünï 日本.mp4"


@pytest.fixture
def tree(tmp_path):
    root_in, root_out, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
    for d in (root_in, root_out, outside, tmp_path / "in2"):
        d.mkdir()
    (root_in / "clip.mp4").write_bytes(b"video")
    (root_in / "sub").mkdir()
    (outside / "secret.txt").write_text("TOPSECRET")
    (tmp_path / "in2" / "clip.mp4").write_bytes(b"video")
    policy = PathPolicy([root_in], [root_out])
    return tmp_path, policy


def refused(call, *args, status=403, code="path_not_allowed") -> ServiceError:
    with pytest.raises(ServiceError) as exc:
        call(*args)
    assert (exc.value.status, exc.value.code) == (status, code), exc.value.message
    assert "TOPSECRET" not in exc.value.message
    return exc.value


def test_allowed_input_returns_resolved_path(tree):
    tmp, policy = tree
    got = policy.check_input(str(tmp / "in" / "sub" / ".." / "clip.mp4"), "video_path")
    assert got == (tmp / "in" / "clip.mp4").resolve()


def test_traversal_and_absolute_paths_outside_are_refused(tree, monkeypatch):
    tmp, policy = tree
    e = refused(policy.check_input, str(tmp / "in" / ".." / "outside" / "secret.txt"), "audio_path")
    assert e.message.startswith("audio_path:") and isinstance(e, PathNotAllowed)
    refused(policy.check_input, "/etc/passwd", "video_path")
    monkeypatch.chdir(tmp / "in")
    refused(policy.check_input, "../../../../../../etc/passwd", "video_path")
    refused(policy.check_input, "../outside/secret.txt", "video_path")
    assert policy.check_input("clip.mp4", "video_path") == (tmp / "in" / "clip.mp4").resolve()


def test_sibling_folder_sharing_the_prefix_is_refused(tree):
    tmp, policy = tree
    refused(policy.check_input, str(tmp / "in2" / "clip.mp4"), "video_path")


def test_symlink_escapes_are_refused_and_inner_links_allowed(tree):
    tmp, policy = tree
    (tmp / "in" / "link.txt").symlink_to(tmp / "outside" / "secret.txt")
    (tmp / "in" / "linkdir").symlink_to(tmp / "outside", target_is_directory=True)
    (tmp / "in" / "inner.mp4").symlink_to(tmp / "in" / "clip.mp4")
    e = refused(policy.check_input, str(tmp / "in" / "link.txt"), "video_path")
    assert "outside" not in e.message.replace("outside the allowed", "")  # the link's target is not revealed
    refused(policy.check_input, str(tmp / "in" / "linkdir" / "secret.txt"), "video_path")
    assert policy.check_input(str(tmp / "in" / "inner.mp4"), "video_path") == (tmp / "in" / "clip.mp4").resolve()


def test_outside_paths_get_403_whether_or_not_they_exist(tree):
    tmp, policy = tree
    refused(policy.check_input, str(tmp / "outside" / "secret.txt"), "video_path")
    refused(policy.check_input, str(tmp / "outside" / "nope.txt"), "video_path")
    refused(policy.check_input, str(tmp / "in" / "nope.mp4"), "video_path", status=400, code="file_not_found")
    refused(policy.check_input, str(tmp / "in" / "sub"), "video_path", status=400, code="file_not_found")


def test_odd_names_are_accepted(tree):
    tmp, policy = tree
    (tmp / "in" / ODD_NAME).write_bytes(b"video")
    assert policy.check_input(str(tmp / "in" / ODD_NAME), "video_path").name == ODD_NAME
    got = policy.check_output(str(tmp / "out" / ODD_NAME), "output_path")
    assert got.name == ODD_NAME and not got.exists()


def test_output_allowed_creates_nothing(tree):
    tmp, policy = tree
    got = policy.check_output(str(tmp / "out" / "result.mp4"), "output_path")
    assert got == (tmp / "out" / "result.mp4").resolve() and not got.exists()
    (tmp / "out" / "old.mp4").write_bytes(b"x")
    assert policy.check_output(tmp / "out" / "old.mp4", "output_path").name == "old.mp4"  # overwriting a file is fine


def test_output_refusals(tree):
    tmp, policy = tree
    refused(policy.check_output, str(tmp / "outside" / "r.mp4"), "output_path")
    refused(policy.check_output, str(tmp / "out" / ".." / "outside" / "r.mp4"), "output_path")
    (tmp / "out" / "escape.mp4").symlink_to(tmp / "outside" / "r.mp4")  # dangling, points outside
    refused(policy.check_output, str(tmp / "out" / "escape.mp4"), "output_path")
    (tmp / "out" / "adir").mkdir()
    refused(policy.check_output, str(tmp / "out" / "adir"), "output_path", status=400, code="output_not_writable")
    refused(policy.check_output, str(tmp / "out" / "new") + "/", "output_path", status=400, code="output_not_writable")
    e = refused(policy.check_output, str(tmp / "out" / "missing" / "r.mp4"), "output_path",
                status=400, code="output_not_writable")
    assert "does not exist" in e.message and not (tmp / "out" / "missing").exists()
    refused(policy.check_output, str(tmp / "out"), "output_path", status=400, code="output_not_writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_folder_not_writable(tree):
    tmp, policy = tree
    ro = tmp / "out" / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(policy.check_output, str(ro / "r.mp4"), "output_path", status=400, code="output_not_writable")
    finally:
        ro.chmod(0o700)


def test_empty_roots_mean_no_restriction_but_files_must_exist(tree):
    tmp, _ = tree
    open_policy = PathPolicy([], [])
    assert open_policy.check_input(str(tmp / "outside" / "secret.txt"), "video_path").name == "secret.txt"
    assert open_policy.check_output(str(tmp / "outside" / "r.mp4"), "output_path").name == "r.mp4"
    refused(open_policy.check_input, str(tmp / "outside" / "nope"), "video_path", status=400, code="file_not_found")


def test_roots_are_resolved_and_must_exist(tree):
    tmp, _ = tree
    (tmp / "in_link").symlink_to(tmp / "in", target_is_directory=True)
    policy = PathPolicy([tmp / "in_link"], [])
    assert policy.check_input(str(tmp / "in" / "clip.mp4"), "video_path").name == "clip.mp4"
    assert policy.check_input(str(tmp / "in_link" / "clip.mp4"), "video_path").name == "clip.mp4"
    with pytest.raises(ValueError, match="input root"):
        PathPolicy([tmp / "nope"], [])
    with pytest.raises(ValueError, match="output root"):
        PathPolicy([], [tmp / "in" / "clip.mp4"])


def test_bad_path_values(tree):
    _, policy = tree
    refused(policy.check_input, "", "video_path", status=400, code="invalid_path")
    refused(policy.check_input, "in/clip\x00.mp4", "video_path", status=400, code="invalid_path")
    long = refused(policy.check_input, "/etc/" + "x" * 5000, "video_path")
    assert len(long.message) < 400
