"""Reading state dicts: formats, wrappers, and errors that name the file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from musetalk_service.errors import WeightsError
from musetalk_service.nets.loading import WeightsFileError, build_and_load, load_state_dict, read_json


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.tensor([1.0, 2.0])}


def test_pth_and_safetensors_give_the_same_tensors(tmp_path, state):
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys()
        for key in state:
            assert torch.equal(loaded[key], state[key])


def test_wrapped_and_dataparallel_checkpoints_are_unwrapped(tmp_path, state):
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ckpt.bin")
    loaded = load_state_dict(tmp_path / "ckpt.bin")
    assert sorted(loaded) == ["bias", "weight"]


def test_truncated_file_is_reported_unreadable_with_its_name(tmp_path, state):
    path = tmp_path / "w.pth"
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsFileError) as info:
        load_state_dict(path)
    assert info.value.path == path
    assert "unreadable" in info.value.reason
    assert str(path) in str(info.value)
    assert isinstance(info.value, WeightsError)  # the API maps it like every weights problem


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(WeightsFileError, match="not a state dict"):
        load_state_dict(tmp_path / "list.pth")


def test_arbitrary_objects_are_refused_by_weights_only_loading(tmp_path):
    torch.save({"weight": torch.zeros(1), "hook": print}, tmp_path / "evil.pth")
    with pytest.raises(WeightsFileError, match="unreadable"):
        load_state_dict(tmp_path / "evil.pth")


def test_build_and_load_reports_missing_unexpected_and_misshapen_tensors(tmp_path):
    path = tmp_path / "linear.pth"
    state = {"weight": torch.zeros(4, 2), "extra": torch.zeros(1)}  # no bias, one stray, wrong shape
    with pytest.raises(WeightsFileError) as info:
        build_and_load(lambda: torch.nn.Linear(3, 4), state, path)
    reason = info.value.reason
    assert "missing tensors (bias)" in reason
    assert "unexpected tensors (extra)" in reason
    assert "weight (4, 2) != (4, 3)" in reason


def test_build_and_load_assigns_the_file_tensors(tmp_path):
    state = {"weight": torch.ones(4, 3), "bias": torch.full((4,), 2.0)}
    model = build_and_load(lambda: torch.nn.Linear(3, 4), state, tmp_path / "linear.pth")
    assert not model.weight.is_meta
    assert torch.equal(model(torch.zeros(1, 3)), torch.full((1, 4), 2.0))


def test_batchnorm_counter_may_be_absent(tmp_path):
    # Checkpoints from before PyTorch 0.4.1 (like the BiSeNet one may be) lack num_batches_tracked.
    bn = torch.nn.BatchNorm2d(2)
    state = {k: v for k, v in bn.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = build_and_load(lambda: torch.nn.BatchNorm2d(2), state, tmp_path / "bn.pth")
    assert int(model.num_batches_tracked) == 0


def test_read_json_names_a_broken_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(WeightsFileError, match="unreadable JSON") as info:
        read_json(path)
    assert info.value.path == path


def test_memory_freed_after_loading_goes_back_to_the_os(tmp_path):
    """What loading leaves behind in the heap (the fp32 host copy of weights that moved on) is
    returned by release_freed_host_memory: measured in a fresh process, on glibc."""
    import subprocess
    import sys

    script = f"""
import gc, torch
from musetalk_service.nets.loading import load_state_dict, release_freed_host_memory
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
torch.save({{f"w{{i}}": torch.randn(512, 512) for i in range(300)}}, {str(tmp_path / "w.pth")!r})  # 300 MB
gc.collect()
state = load_state_dict({str(tmp_path / "w.pth")!r})
kept = {{k: v.half() for k, v in state.items()}}  # what stays: the converted copy
del state
gc.collect()
before = rss_mb()
released = release_freed_host_memory()
print(released, before - rss_mb())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    released, dropped_mb = done.stdout.split()
    if released != "True":
        pytest.skip("no glibc malloc_trim here")
    assert float(dropped_mb) > 150, dropped_mb
