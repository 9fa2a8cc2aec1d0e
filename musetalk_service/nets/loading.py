"""Reading weight files and putting them into networks, with errors that name the file.

Networks are built on the meta device (no memory, no random init: building the full UNet on CPU
would cost seconds and 3.4 GB for values that are overwritten at once) and the tensors read from the
file are assigned in place. Key or shape mismatches are reported before anything is assigned.
"""

from __future__ import annotations

import ctypes
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from musetalk_service.errors import WeightsError

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
ModuleT = TypeVar("ModuleT", bound=nn.Module)

# BatchNorm's step counter: checkpoints saved before PyTorch 0.4.1 do not have it, and inference never reads it.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_SHOWN = 5  # mismatching keys listed per kind in an error message


class WeightsFileError(WeightsError):
    """A weight or config file is unreadable or does not fit its network; `path` names it."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def load_state_dict(path: str | Path) -> StateDict:
    """Read a state dict from .pth/.bin (torch.load, weights only) or .safetensors, on CPU.

    A checkpoint wrapped as {'state_dict': ...} is unwrapped and a DataParallel 'module.' prefix is
    removed. Raises WeightsFileError naming the file when it is missing, unreadable or not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(path, "file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load and safetensors fail with many types (UnpicklingError, RuntimeError, EOFError,
    # zipfile and safetensors errors) for a truncated or foreign file: all mean "unreadable".
    except Exception as e:
        raise WeightsFileError(path, f"unreadable ({type(e).__name__}: {e})") from e
    return _unwrap(state, path)


def release_freed_host_memory() -> bool:
    """Hand the heap memory freed so far back to the OS; False where that is not possible.

    glibc keeps freed heap blocks mapped, so without this the process stays resident at its
    highest point. Called after loading: torch.load reads a checkpoint into many blocks of a few
    MB, free once the weights are on the GPU (4-5 GB resident on the H100 box for the full set,
    most of it the 3.4 GB fp32 UNet). And after each request (`LipsyncPipeline`): frame batches
    freed there kept resident memory creeping from request to request. Only glibc has
    malloc_trim (not musl, not macOS).
    """
    try:
        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim(0)
    return True


def _unwrap(state: object, path: Path) -> StateDict:
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise WeightsFileError(path, f"not a state dict (found {type(state).__name__})")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsFileError(path, f"not a state dict: {_listing(not_tensors)} are not tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def build_and_load(build: Callable[[], ModuleT], state: StateDict, path: str | Path) -> ModuleT:
    """Build a network on the meta device and assign `state` (read from `path`) to it, strictly.

    Returns the network on CPU holding the file's tensors, in the file's dtype. Raises
    WeightsFileError naming `path` on missing, unexpected or wrongly shaped tensors.
    """
    with torch.device("meta"):
        model = build()
    state = dict(state)
    expected = model.state_dict()
    for key in expected.keys() - state.keys():
        if key.endswith(_OPTIONAL_SUFFIXES):
            state[key] = torch.zeros((), dtype=expected[key].dtype)
    _check_fits(expected, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left_on_meta:
        # A buffer that is not saved in state dicts cannot be filled from a file: the network
        # class needs another build path. This is a bug of ours, not of the file.
        raise RuntimeError(f"{type(model).__name__} keeps tensors outside its state dict: {left_on_meta[:_SHOWN]}")
    logger.debug("loaded %s from %s (%d tensors)", type(model).__name__, path, len(state))
    return model


def build_from_config(model_cls, config: dict, config_path: str | Path):
    """`model_cls.from_config(config)` for a diffusers model; WeightsFileError naming `config_path`
    if the config is invalid (diffusers validates block lists with ValueError; wrong value types
    surface as TypeError/KeyError)."""
    try:
        return model_cls.from_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise WeightsFileError(config_path, f"not a valid {model_cls.__name__} config ({e})") from e


def read_json(path: str | Path) -> dict:
    """Read a JSON config file; WeightsFileError naming it when missing, unreadable or not an object."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(path, "file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsFileError(path, f"unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise WeightsFileError(path, f"not a JSON object (found {type(data).__name__})")
    return data


def _check_fits(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({_listing(unexpected)})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensors of the wrong shape ({_listing(sorted(wrong_shape))})")
    if problems:
        raise WeightsFileError(path, "does not fit the network: " + "; ".join(problems))


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")

