"""Fixtures of the API tests: the app served by a real server, with the session's tiny pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from musetalk_service.api.app import create_app
from musetalk_service.pipeline.runner import LipsyncPipeline
from musetalk_service.settings import Settings
from tests.api.live import live_server

# Around the astronaut's face in the 128x128 clips (the 256x256 FACE_BOX, halved).
SMALL_FACE_BOX = [36, 10, 76, 50]


@pytest.fixture(scope="session")
def client(tiny_settings: Settings, tiny_pipeline: LipsyncPipeline) -> Iterator[httpx.Client]:
    """A client of the session's server: the app with the shared tiny pipeline injected."""
    with live_server(create_app(tiny_settings, tiny_pipeline)) as client:
        yield client


@pytest.fixture(scope="session")
def small_video(make_video) -> Path:
    """0.4 s, 25 fps, 128x128 talking head (10 frames): the cheapest clip a real job can use."""
    return make_video(0.4, 25, (128, 128))


@pytest.fixture(scope="session")
def short_audio(make_audio) -> Path:
    """0.2 s of speech-like audio: 5 output frames at 25 fps."""
    return make_audio(0.2)


@pytest.fixture(scope="session")
def blip_audio(make_audio) -> Path:
    """0.06 s of audio: one output frame at 25 fps (load and soak tests)."""
    return make_audio(0.06)


@pytest.fixture
def serve(tiny_settings: Settings, tiny_pipeline: LipsyncPipeline, tmp_path: Path):
    """Factory: `with serve(pipeline=None, headers=None, servers=None, **settings) as client:` a
    server with the tiny pipeline (or `pipeline`) and settings changed as given (nested sections
    as dicts, merged into the session's). Output and work folders are this test's own."""

    @contextmanager
    def start(pipeline=None, headers=None, servers=None, ready_timeout_s: float = 5.0, **changes) -> Iterator[httpx.Client]:
        base = {"output_dir": tmp_path / "outputs", "work_dir": tmp_path / "work"}
        base["work_dir"].mkdir(exist_ok=True)
        update = {**base, **changes}
        for section in ("jobs", "limits", "lipsync"):
            if section in update and isinstance(update[section], dict):
                update[section] = getattr(tiny_settings, section).model_copy(update=update[section])
        settings = tiny_settings.model_copy(update=update)
        app = create_app(settings, pipeline if pipeline is not None else tiny_pipeline, ready_timeout_s=ready_timeout_s)
        with live_server(app, headers=headers, servers=servers) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client

    return start
