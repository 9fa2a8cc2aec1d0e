"""What a weights folder holds: each file present, missing or malformed, and where the weights came from.

"Malformed" means the file cannot be read, or its tensors do not fit the architecture that its
config (or, for the face networks, its own shapes) describes. Checking runs the real loaders, one
network at a time, so a folder that checks clean is one that `ModelBundle.load` accepts.
`check_weights` and `weights_kind` take the settings' `face.detector`: with "haar", S3FD and FAN
are never loaded, so they are neither checked nor counted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from musetalk_service.nets import bisenet, fan, s3fd
from musetalk_service.nets.layout import PROVENANCE_FILE, WEIGHT_FILES, FaceDetector, needed_files, weight_file
from musetalk_service.nets.loading import WeightsFileError
from musetalk_service.nets.unet import load_unet
from musetalk_service.nets.vae import load_vae
from musetalk_service.nets.whisper import load_feature_extractor, load_whisper_encoder

logger = logging.getLogger(__name__)

Status = Literal["present", "missing", "malformed"]
WeightsKind = Literal["random", "official", "custom"]


def _face_net(key: str, load: Callable[[Path, str], object]) -> Callable[[Path], object]:
    return lambda models_dir: load(weight_file(key).find(models_dir), "cpu")


# Each network: the layout files it is built from, and the loader that reads them.
_NETWORKS: tuple[tuple[tuple[str, ...], Callable[[Path], object]], ...] = (
    (("unet_config", "unet"), load_unet),
    (("vae_config", "vae"), load_vae),
    (("whisper_config", "whisper"), load_whisper_encoder),
    (("whisper_preprocessor",), load_feature_extractor),
    (("face_parser",), _face_net("face_parser", bisenet.load)),
    (("face_detector",), _face_net("face_detector", s3fd.load)),
    (("landmarker",), _face_net("landmarker", fan.load)),
)


@dataclass(frozen=True)
class FileReport:
    """One layout file: `relpath` (canonical name), its status, the stored `path`, and why it is malformed."""

    relpath: str
    status: Status
    path: Path | None = None
    reason: str = ""


@dataclass(frozen=True)
class WeightsReport:
    """The state of a weights folder, one `FileReport` per layout file the detector needs, plus the
    weights kind."""

    models_dir: Path
    kind: WeightsKind
    files: tuple[FileReport, ...]
    not_needed: tuple[str, ...] = ()
    """Layout files (relpaths) the checked detector never loads (S3FD and FAN for haar): not checked."""

    @property
    def ok(self) -> bool:
        return all(f.status == "present" for f in self.files)

    @property
    def missing(self) -> list[FileReport]:
        return [f for f in self.files if f.status == "missing"]

    @property
    def malformed(self) -> list[FileReport]:
        return [f for f in self.files if f.status == "malformed"]

    def file(self, relpath: str) -> FileReport:
        """The report of one layout file, by its canonical relative path."""
        return next(f for f in self.files if f.relpath == relpath)

    def summary(self) -> str:
        """Human-readable lines, one per file, for the CLI."""
        lines = [f"weights in {self.models_dir}: {self.kind}, {'ok' if self.ok else 'NOT usable'}"]
        for f in self.files:
            shown = f.path.relative_to(self.models_dir).as_posix() if f.path else f.relpath
            lines.append(f"  {f.status:<9} {shown}" + (f"  ({f.reason})" if f.reason else ""))
        if self.not_needed:
            lines.append(f"  not checked, only face.detector: s3fd loads them: {', '.join(self.not_needed)}")
        return "\n".join(lines)


def check_weights(models_dir: str | Path, detector: FaceDetector = "s3fd") -> WeightsReport:
    """Report every layout file that `detector` needs as present, missing or malformed (with the reason).

    Each network whose files are all present is loaded on CPU with the service's own loaders; a
    failure marks the file it names as malformed. Nothing is raised for a bad folder.
    """
    models_dir = Path(models_dir)
    needed = needed_files(detector)
    found: dict[str, Path | None] = {f.key: f.find(models_dir) for f in needed}
    problems: dict[str, str] = {}
    for keys, load in _NETWORKS:
        # Networks with a file missing, or one the detector does not need (not in `found`), are not loaded.
        if any(found.get(k) is None for k in keys):
            continue
        try:
            load(models_dir)
        except WeightsFileError as e:
            problems[_blamed(e.path, keys, found)] = e.reason
            logger.warning("malformed weights: %s", e)
    reports = []
    for entry in needed:
        path = found[entry.key]
        if path is None:
            reports.append(FileReport(entry.relpath, "missing"))
        elif entry.key in problems:
            reports.append(FileReport(entry.relpath, "malformed", path, problems[entry.key]))
        else:
            reports.append(FileReport(entry.relpath, "present", path))
    not_needed = tuple(f.relpath for f in WEIGHT_FILES if f not in needed)
    return WeightsReport(models_dir, weights_kind(models_dir, detector), tuple(reports), not_needed)


def _blamed(path: Path, keys: tuple[str, ...], found: dict[str, Path | None]) -> str:
    for key in keys:
        if found[key] is not None and found[key].resolve() == path.resolve():
            return key
    # An error about a file outside the layout (should not happen): blame the network's weights.
    return keys[-1]


def weights_kind(models_dir: str | Path, detector: FaceDetector = "s3fd") -> WeightsKind:
    """"random" if PROVENANCE.json says so; "official" if it says official and every recorded file
    that `detector` needs still has its recorded size; "custom" otherwise (no or unreadable
    provenance, files changed). With "haar", recorded S3FD and FAN files may be gone or changed:
    they are never loaded."""
    provenance = _read_provenance(Path(models_dir) / PROVENANCE_FILE)
    kind = provenance.get("kind")
    if kind == "random":
        return "random"
    files = provenance.get("files")
    if kind == "official" and isinstance(files, dict) and files:
        unused = {f.relpath for f in WEIGHT_FILES if f not in needed_files(detector)}
        if all(_same_size(Path(models_dir) / rel, meta) for rel, meta in files.items() if rel not in unused):
            return "official"
        logger.info("%s: files differ from the official download, weights are custom", models_dir)
    return "custom"


def _read_provenance(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        logger.warning("unreadable %s (%s): weights count as custom", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _same_size(path: Path, meta: object) -> bool:
    return isinstance(meta, dict) and path.is_file() and path.stat().st_size == meta.get("size")

