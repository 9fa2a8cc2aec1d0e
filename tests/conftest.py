"""Shared fixtures live in tests/fixtures/, one module per layer, loaded here as plugins."""

pytest_plugins = ["tests.fixtures.media", "tests.fixtures.models", "tests.fixtures.pipeline", "tests.fixtures.web"]
