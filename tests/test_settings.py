"""Settings: the compose path each value picks, from the environment as operators set it."""

from __future__ import annotations

import pytest

from musetalk_service.settings import load_settings


@pytest.mark.parametrize(
    "value, device, on_device",
    [("auto", "cuda:0", True), ("auto", "cpu", False), ("numpy", "cuda:0", False), ("device", "cpu", True)],
)
def test_compose_setting_picks_the_path(monkeypatch, value, device, on_device):
    monkeypatch.setenv("MUSETALK_COMPOSE", value)
    assert load_settings().composes_on_device(device) is on_device


def test_an_unknown_compose_value_is_refused_naming_the_field(monkeypatch):
    monkeypatch.setenv("MUSETALK_COMPOSE", "gpu")
    with pytest.raises(ValueError, match="compose"):
        load_settings()
