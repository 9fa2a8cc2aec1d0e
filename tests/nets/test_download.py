"""download_weights against a fake Hugging Face hub on 127.0.0.1.

The fake hub answers what huggingface_hub 2.4's hf_hub_download asks: HEAD then GET on
/{repo}/resolve/main/{file}. Small files are served in place (ETag, X-Repo-Commit, Content-Length);
weight files answer like the real hub's LFS files, a 302 to a CDN host (another port) with
X-Linked-Etag / X-Linked-Size. The download runs in a subprocess, because huggingface_hub reads
HF_ENDPOINT once at import: this also checks that the variable alone redirects the download.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from musetalk_service.nets.bundle import ModelBundle
from musetalk_service.nets.check import check_weights, weights_kind
from musetalk_service.nets.layout import FACE_NET_KEYS, PROVENANCE_FILE, WEIGHT_FILES
from musetalk_service.nets.loading import load_state_dict

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LANDMARKER_PATH = "/downloads/2DFAN-4.pth.tar"

DOWNLOAD_SCRIPT = """
import dataclasses, sys
from musetalk_service.nets.download import download_weights
from musetalk_service.nets.layout import WEIGHT_FILES
# The landmarker has no hub repo: its plain URL is pointed at the fake server too.
files = [dataclasses.replace(f, url=sys.argv[2]) if f.url else f for f in WEIGHT_FILES]
download_weights(sys.argv[1], files=files)
"""


class FakeHub:
    """Hub and CDN servers holding `blobs`: {(repo_id, filename) or url path: bytes}."""

    def __init__(self, blobs: dict[tuple[str, str] | str, bytes]):
        self.blobs = blobs
        self.requests: list[tuple[str, str]] = []
        self.by_sha = {hashlib.sha256(b).hexdigest(): b for b in blobs.values()}
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_port}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(with_body=False)

            def do_GET(self) -> None:
                self._answer(with_body=True)

            def _answer(self, with_body: bool) -> None:
                hub.requests.append((self.command, self.path))
                if self.path.startswith("/cdn/"):
                    return self._send(hub.by_sha.get(self.path.removeprefix("/cdn/")), with_body)
                if self.path == LANDMARKER_PATH:
                    return self._send(hub.blobs.get(LANDMARKER_PATH), with_body)
                repo_id, sep, filename = self.path.lstrip("/").partition("/resolve/main/")
                body = hub.blobs.get((repo_id, filename)) if sep else None
                if body is None or not filename.endswith((".pth", ".bin")):
                    return self._send(body, with_body, {"ETag": f'"{hashlib.sha1(body or b"").hexdigest()}"'})
                sha = hashlib.sha256(body).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{hub.cdn.server_port}/cdn/{sha}")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(body)))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, body: bytes | None, with_body: bool, headers: dict[str, str] | None = None) -> None:
                if body is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

        return Handler

    def __enter__(self) -> FakeHub:
        for server in (self.hub, self.cdn):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()


def _blobs(models_dir: Path, keys: set[str]) -> dict[tuple[str, str] | str, bytes]:
    """The files of `keys` from `models_dir`, under their official repos and names."""
    blobs: dict[tuple[str, str] | str, bytes] = {}
    for entry in WEIGHT_FILES:
        if entry.key in keys:
            content = entry.path(models_dir).read_bytes()
            blobs[(entry.repo_id, entry.filename) if entry.repo_id else LANDMARKER_PATH] = content
    return blobs


@pytest.fixture
def fake_hub(tiny_models_dir: Path) -> Iterator[FakeHub]:
    """A hub serving the tiny random files under their official repos and names."""
    with FakeHub(_blobs(tiny_models_dir, {f.key for f in WEIGHT_FILES})) as hub:
        yield hub


def _hub_env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",  # the fake hub speaks plain HTTP only
    }
    env.pop("HF_HUB_OFFLINE", None)
    return env


def _download(hub: FakeHub, models_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", DOWNLOAD_SCRIPT, str(models_dir), hub.endpoint + LANDMARKER_PATH],
        env=_hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300,
    )


def test_download_fills_the_layout_from_the_hub(fake_hub, tiny_models_dir, tmp_path):
    models_dir = tmp_path / "models"
    result = _download(fake_hub, models_dir, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    for entry in WEIGHT_FILES:
        assert entry.path(models_dir).read_bytes() == entry.path(tiny_models_dir).read_bytes(), entry.relpath
    # Weight files took the LFS route (HEAD on the hub, GET on the CDN host), configs the direct one.
    assert ("HEAD", "/TMElyralab/MuseTalk/resolve/main/musetalkV15/unet.pth") in fake_hub.requests
    assert any(method == "GET" and path.startswith("/cdn/") for method, path in fake_hub.requests)
    assert ("GET", "/openai/whisper-tiny/resolve/main/config.json") in fake_hub.requests

    provenance = json.loads((models_dir / PROVENANCE_FILE).read_text())
    assert provenance["kind"] == "official"
    unet = provenance["files"]["musetalkV15/unet.pth"]
    unet_bytes = (models_dir / "musetalkV15/unet.pth").read_bytes()
    assert unet["size"] == len(unet_bytes) and unet["sha256"] == hashlib.sha256(unet_bytes).hexdigest()
    assert unet["source"] == "hf://TMElyralab/MuseTalk/musetalkV15/unet.pth"

    assert check_weights(models_dir).ok
    bundle = ModelBundle.load(models_dir, "cpu")
    assert bundle.weights_kind == "official"
    reference = load_state_dict(tiny_models_dir / "musetalkV15/unet.pth")
    assert all(torch.equal(bundle.unet.state_dict()[k], v) for k, v in reference.items())


def test_second_download_fetches_nothing_again_and_changed_files_turn_custom(fake_hub, tmp_path):
    models_dir = tmp_path / "models"
    assert _download(fake_hub, models_dir, tmp_path).returncode == 0
    fake_hub.requests.clear()
    result = _download(fake_hub, models_dir, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Only metadata (HEAD) requests: every file was already complete.
    assert fake_hub.requests and all(method == "HEAD" for method, _ in fake_hub.requests)

    assert weights_kind(models_dir) == "official"
    with open(models_dir / "face-parse-bisent/79999_iter.pth", "ab") as f:
        f.write(b"\0")
    assert weights_kind(models_dir) == "custom"


def test_failed_download_names_the_file_and_leaves_no_provenance(tmp_path):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / PROVENANCE_FILE).write_text('{"kind": "random", "size": "tiny", "seed": 0}')
    with FakeHub({}) as hub:
        result = _download(hub, models_dir, tmp_path)
    assert result.returncode != 0
    assert "musetalk.json" in result.stderr  # the hub error names the file
    # Half-replaced files must not keep passing for the random set they were.
    assert weights_kind(models_dir) == "custom"


def test_cli_download_in_haar_mode_skips_s3fd_and_fan(tiny_models_dir, tmp_path):
    # A hub without S3FD, and 2DFAN4's own URL never asked: the machine the Haar mode is for.
    models_dir = tmp_path / "models"
    hub_keys = {f.key for f in WEIGHT_FILES} - set(FACE_NET_KEYS)
    with FakeHub(_blobs(tiny_models_dir, hub_keys)) as hub:
        result = subprocess.run(
            [sys.executable, "-m", "musetalk_service", "weights", "download", "--dir", str(models_dir)],
            env={**_hub_env(hub, tmp_path), "MUSETALK_FACE__DETECTOR": "haar"},
            capture_output=True, text=True, timeout=300,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not downloading face-detection/s3fd.pth, face-detection/2DFAN4.pth" in result.stdout
    assert not any("s3fd" in path or "2DFAN" in path for _, path in hub.requests)

    face_net_files = {f.relpath for f in WEIGHT_FILES if f.key in FACE_NET_KEYS}
    assert not any((models_dir / relpath).exists() for relpath in face_net_files)
    recorded = json.loads((models_dir / PROVENANCE_FILE).read_text())["files"]
    assert set(recorded) == {f.relpath for f in WEIGHT_FILES} - face_net_files
    assert check_weights(models_dir, "haar").ok
    bundle = ModelBundle.load(models_dir, "cpu", detector="haar")
    assert bundle.weights_kind == "official" and bundle.face_detector is None
