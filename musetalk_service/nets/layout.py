"""The official on-disk layout of the weights folder, and where each file comes from.

The layout is MuseTalk's own `models/` folder (see models/README.md), so a folder filled by the
official `download_weights.sh` works as is. Every weight file may also be stored as `.safetensors`
next to where the `.pth`/`.bin` would be (`WeightFile.alternates`); the loaders look for either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

PROVENANCE_FILE = "PROVENANCE.json"

DOWNLOAD_COMMAND = "musetalk-service weights download --dir {dir}"
RANDOM_COMMAND = "musetalk-service weights random --dir {dir}"

FaceDetector = Literal["s3fd", "haar"]
"""`face.detector` in the settings. The Haar cascade ships inside OpenCV, so `haar` needs no weights
file of its own and none of the S3FD + FAN ones (`FACE_NET_KEYS`)."""


@dataclass(frozen=True)
class WeightFile:
    """One file of the layout and its public source.

    `relpath` is the path under the models folder. The source is either a Hugging Face repo
    (`repo_id` + `filename`, the path inside the repo) or, where no hub repo hosts the file, a plain
    `url`. `alternates` are other accepted names in the same folder (the safetensors form).
    """

    key: str
    relpath: str
    repo_id: str | None = None
    filename: str | None = None
    url: str | None = None
    alternates: tuple[str, ...] = ()

    def path(self, models_dir: str | Path) -> Path:
        """Where the file goes under `models_dir` (the canonical name)."""
        return Path(models_dir) / PurePosixPath(self.relpath)

    def find(self, models_dir: str | Path) -> Path | None:
        """The file as stored: the canonical name, else the first alternate present, else None."""
        canonical = self.path(models_dir)
        for candidate in (canonical, *(canonical.with_name(name) for name in self.alternates)):
            if candidate.is_file():
                return candidate
        return None


def _weights(key: str, relpath: str, safetensors_name: str, **source: str) -> WeightFile:
    return WeightFile(key=key, relpath=relpath, alternates=(safetensors_name,), **source)


WEIGHT_FILES: tuple[WeightFile, ...] = (
    WeightFile("unet_config", "musetalkV15/musetalk.json", "TMElyralab/MuseTalk", "musetalkV15/musetalk.json"),
    _weights("unet", "musetalkV15/unet.pth", "unet.safetensors",
             repo_id="TMElyralab/MuseTalk", filename="musetalkV15/unet.pth"),
    WeightFile("vae_config", "sd-vae/config.json", "stabilityai/sd-vae-ft-mse", "config.json"),
    _weights("vae", "sd-vae/diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
             repo_id="stabilityai/sd-vae-ft-mse", filename="diffusion_pytorch_model.bin"),
    WeightFile("whisper_config", "whisper/config.json", "openai/whisper-tiny", "config.json"),
    # transformers names the safetensors form model.safetensors, not pytorch_model.safetensors.
    _weights("whisper", "whisper/pytorch_model.bin", "model.safetensors",
             repo_id="openai/whisper-tiny", filename="pytorch_model.bin"),
    WeightFile("whisper_preprocessor", "whisper/preprocessor_config.json", "openai/whisper-tiny",
               "preprocessor_config.json"),
    _weights("face_parser", "face-parse-bisent/79999_iter.pth", "79999_iter.safetensors",
             repo_id="ManyOtherFunctions/face-parse-bisent", filename="79999_iter.pth"),
    # S3FD as face-alignment publishes it (s3fd-619a316812.pth, 89.8 MB), mirrored on the hub.
    _weights("face_detector", "face-detection/s3fd.pth", "s3fd.safetensors",
             repo_id="Cong-HGMedia/facedetection", filename="s3fd.pth"),
    # No hub repo hosts Adrian Bulat's 2DFAN-4 state dict; this is the author's own download link.
    _weights("landmarker", "face-detection/2DFAN4.pth", "2DFAN4.safetensors",
             url="https://www.adrianbulat.com/downloads/python-fan/2DFAN-4.pth.tar"),
)

FILES_BY_KEY: dict[str, WeightFile] = {f.key: f for f in WEIGHT_FILES}

FACE_NET_KEYS = ("face_detector", "landmarker")
"""S3FD and 2DFAN4: only `face.detector: s3fd` loads them. They are also the two files that are
hardest to fetch (2DFAN4 only from its author's site), which is why the Haar mode exists."""


def needed_files(detector: FaceDetector) -> tuple[WeightFile, ...]:
    """The layout files the service loads with `detector`: every one for s3fd, all but S3FD and FAN for haar."""
    if detector == "s3fd":
        return WEIGHT_FILES
    return tuple(f for f in WEIGHT_FILES if f.key not in FACE_NET_KEYS)


def weight_file(key: str) -> WeightFile:
    """The layout entry named `key` (e.g. "unet", "vae_config")."""
    return FILES_BY_KEY[key]
