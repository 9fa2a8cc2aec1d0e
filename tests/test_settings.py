"""Settings: the compose path and compile options each value picks, from the environment as operators set it."""

from __future__ import annotations

import os

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


@pytest.mark.parametrize(
    "env, device, mode, graphs",
    [
        ({}, "cuda:0", "default", True),
        ({}, "cpu", None, False),
        ({"MUSETALK_COMPILE__CUDA_GRAPHS": "false"}, "cuda:0", "default", False),
        ({"MUSETALK_COMPILE__ENABLED": "false"}, "cuda:0", None, False),
        ({"MUSETALK_COMPILE__ENABLED": "true"}, "cpu", "default", False),  # graphs need CUDA
    ],
)
def test_compile_settings_pick_the_mode_and_the_cuda_graphs(monkeypatch, env, device, mode, graphs):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    compile_settings = load_settings().compile
    assert compile_settings.mode_for(device) == mode
    assert compile_settings.graphs_for(device) is graphs


def test_reduce_overhead_is_refused_naming_the_field(monkeypatch):
    """torch.compile's own CUDA graphs hung the first request (see nets/fixed_batch.py)."""
    monkeypatch.setenv("MUSETALK_COMPILE__MODE", "reduce-overhead")
    with pytest.raises(ValueError, match="mode"):
        load_settings()


def test_expandable_segments_are_the_default_unless_the_operator_configured_the_allocator(monkeypatch):
    from musetalk_service.nets.runtime import ALLOCATOR_ENV, use_expandable_segments

    for name in ALLOCATOR_ENV:  # set, then removed: monkeypatch restores them after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    use_expandable_segments()
    assert "expandable_segments:True" in [os.environ.get(name) for name in ALLOCATOR_ENV]
    monkeypatch.delenv(ALLOCATOR_ENV[0])
    monkeypatch.setenv(ALLOCATOR_ENV[1], "max_split_size_mb:128")
    use_expandable_segments()
    assert ALLOCATOR_ENV[0] not in os.environ  # the operator's setting stands alone


def test_gpu_memory_is_capped_at_8_gb_unless_configured(monkeypatch):
    assert load_settings().gpu_memory_gb == 8.0
    monkeypatch.setenv("MUSETALK_GPU_MEMORY_GB", "20")
    assert load_settings().gpu_memory_gb == 20.0
    monkeypatch.setenv("MUSETALK_GPU_MEMORY_GB", "0")
    with pytest.raises(ValueError, match="gpu_memory_gb"):
        load_settings()
