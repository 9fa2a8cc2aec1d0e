"""Fixtures of the API tests: the app served by a real server, with the session's tiny pipeline."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from musetalk_service.api.app import create_app
from musetalk_service.pipeline.runner import LipsyncPipeline
from musetalk_service.settings import Settings
from tests.api.live import live_server


@pytest.fixture(scope="session")
def client(tiny_settings: Settings, tiny_pipeline: LipsyncPipeline) -> Iterator[httpx.Client]:
    """A client of the session's server: the app with the shared tiny pipeline injected."""
    with live_server(create_app(tiny_settings, tiny_pipeline)) as client:
        yield client
