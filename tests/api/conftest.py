"""Fixtures of the API tests: the app served by a real server, with a pipeline of tiny random weights on CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from musetalk_service.api.app import create_app
from musetalk_service.pipeline.runner import LipsyncPipeline
from musetalk_service.settings import Settings, load_settings
from tests.api.live import live_server


@pytest.fixture(scope="session")
def tiny_settings(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(models_dir=tiny_models_dir, device="cpu", output_dir=tmp_path_factory.mktemp("outputs"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_settings: Settings) -> LipsyncPipeline:
    return LipsyncPipeline.load(tiny_settings)


@pytest.fixture(scope="session")
def client(tiny_settings: Settings, tiny_pipeline: LipsyncPipeline) -> Iterator[httpx.Client]:
    """A client of the session's server: the app with the shared tiny pipeline injected."""
    with live_server(create_app(tiny_settings, tiny_pipeline)) as client:
        yield client
