"""Every network the pipeline needs, loaded once, frozen, on one device and dtype.

fp16 on CUDA (as the official realtime path runs), fp32 on CPU (CPU fp16 kernels are slow or
missing). The bundle is read-only after `load`: requests never change it.

The networks the pipeline calls per batch (`generator`, `latent_encoder`, `landmarker`) are
`FixedBatch` runners: on CUDA they are compiled (`compile_mode`) at one batch size each and
compiled during `warmup`, so no request ever waits for a compilation; with `cuda_graphs`, warmup
also records the generator and FAN into CUDA graphs that calls then replay.

With `detector="haar"` S3FD and FAN are neither required nor loaded (`face_detector` and
`landmarker` are None): the Haar cascade ships inside OpenCV, and a machine that cannot fetch those
two files still runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from musetalk_service.errors import WeightsError
from musetalk_service.nets import bisenet, fan, s3fd
from musetalk_service.nets.check import WeightsKind, weights_kind
from musetalk_service.nets.fixed_batch import FixedBatch
from musetalk_service.nets.layout import (
    DOWNLOAD_COMMAND,
    FACE_NET_KEYS,
    RANDOM_COMMAND,
    FaceDetector,
    needed_files,
    weight_file,
)
from musetalk_service.nets.loading import WeightsFileError, release_freed_host_memory
from musetalk_service.nets.musetalk import FaceGenerator, FaceLatentEncoder
from musetalk_service.nets.unet import PositionalEncoding, load_unet
from musetalk_service.nets.vae import load_vae
from musetalk_service.nets.whisper import N_MEL_FRAMES, load_feature_extractor, load_whisper_encoder

logger = logging.getLogger(__name__)

# Whisper feature frames per video frame window: the pipeline takes 10 steps (200 ms at 50 Hz).
WINDOW_STEPS = 10
LATENT_SIZE = 32  # UNet/VAE latent side for the 256x256 face crop
FACE_SIZE = 256
PARSER_SIZE = 512


@dataclass(frozen=True)
class ModelBundle:
    """The loaded networks (see docs/architecture.md, nets/)."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    pe: PositionalEncoding
    whisper: WhisperEncoder
    feature_extractor: WhisperFeatureExtractor
    face_parser: bisenet.BiSeNet
    face_detector: nn.Module | None
    """S3FD; None when loaded for the Haar detector."""
    landmarker: FixedBatch | None
    """FAN: `[n, 3, 256, 256]` crops -> `[n, 68, 64, 64]` heatmaps; None when loaded for the Haar detector."""
    generator: FixedBatch
    """`nets.musetalk.FaceGenerator`: latents + audio tokens -> uint8 BGR faces."""
    latent_encoder: FixedBatch
    """`nets.musetalk.FaceLatentEncoder`: masked + reference faces -> UNet input latents."""
    device: torch.device
    dtype: torch.dtype
    weights_kind: WeightsKind
    models_dir: Path

    @classmethod
    def load(
        cls,
        models_dir: str | Path,
        device: str | torch.device = "cpu",
        *,
        batch_size: int = 16,
        prepare_batch: int = 16,
        encode_batch: int = 16,
        compile_mode: str | None = None,
        cuda_graphs: bool = False,
        detector: FaceDetector = "s3fd",
    ) -> ModelBundle:
        """Load every network of `models_dir` onto `device` ("auto": CUDA when available, else CPU).

        `batch_size`: output frames per `generator` call; `prepare_batch`: source frames per
        `landmarker` call, `encode_batch` per `latent_encoder` call; `compile_mode`:
        torch.compile mode for those three, None for eager; `cuda_graphs`: the generator and the
        landmarker replay CUDA graphs (on CUDA). `detector`: the settings' `face.detector`;
        "haar" leaves S3FD and FAN out (their files may be absent). Raises WeightsError naming the missing files and the
        command that fetches them, or naming a malformed file and why it does not fit.
        """
        models_dir = Path(models_dir)
        device = resolve_device(device)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        _require_files(models_dir, detector)
        started = time.perf_counter()
        try:
            whisper = _ready(load_whisper_encoder(models_dir), device, dtype)
            unet = _ready(load_unet(models_dir), device, dtype)
            _check_audio_dims(unet, whisper, models_dir)
            vae = _ready(load_vae(models_dir), device, dtype)
            pe = _ready(PositionalEncoding(d_model=whisper.config.d_model), device, dtype)
            face_detector = landmarker = None
            if detector == "s3fd":
                face_detector = _ready(s3fd.load(_stored("face_detector", models_dir)), device, dtype)
                fan_net = _ready(fan.load(_stored("landmarker", models_dir)), device, dtype)
                landmarker = FixedBatch(fan_net, prepare_batch, compile_mode, cuda_graph=cuda_graphs)
            bundle = cls(
                vae=vae,
                unet=unet,
                pe=pe,
                whisper=whisper,
                feature_extractor=load_feature_extractor(models_dir),
                face_parser=_ready(bisenet.load(_stored("face_parser", models_dir)), device, dtype),
                face_detector=face_detector,
                landmarker=landmarker,
                generator=FixedBatch(
                    _ready(FaceGenerator(unet, vae, pe), device, dtype), batch_size, compile_mode, cuda_graph=cuda_graphs
                ),
                # No graph: at this batch its launches cost little next to its kernels, and its
                # graph held 6.1 GB (nets/fixed_batch.py). Its activations set a new video's
                # memory peak: at 16 rows (32 images of 256x256), 2.0 GB of the 2.7 GB alive above
                # the ready state at the peak (torch's allocator history on the H100, 2026-11-24),
                # hence small calls (runtime.load_models: a quarter of a preparation run).
                latent_encoder=FixedBatch(FaceLatentEncoder(vae), encode_batch, compile_mode),
                device=device,
                dtype=dtype,
                weights_kind=weights_kind(models_dir, detector),
                models_dir=models_dir,
            )
        except WeightsFileError as e:
            raise WeightsFileError(e.path, f"{e.reason}. Replace it: {DOWNLOAD_COMMAND.format(dir=models_dir)}") from e
        # The host copies of the weights are garbage now (on CPU the modules hold their own).
        release_freed_host_memory()
        logger.info(
            "loaded %s weights from %s on %s/%s in %.1f s",
            bundle.weights_kind, models_dir, device, dtype, time.perf_counter() - started,
        )
        return bundle

    @property
    def token_count(self) -> int:
        """Audio tokens per video frame: 10 whisper steps x (embeddings + each encoder layer)."""
        return WINDOW_STEPS * (self.whisper.config.encoder_layers + 1)

    @property
    def audio_dim(self) -> int:
        """Width of each audio token (whisper d_model, = the UNet's cross_attention_dim)."""
        return self.whisper.config.d_model

    def warmup(self) -> None:
        """One forward through each network at the pipeline's shapes (allocations, kernel
        selection); the fixed-batch runners at their batch size, which compiles them. S3FD and
        FAN only where loaded."""
        started = time.perf_counter()

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=self.device, dtype=self.dtype)

        with torch.inference_mode():
            mel = zeros(1, self.whisper.config.num_mel_bins, N_MEL_FRAMES)
            self.whisper(mel, output_hidden_states=True)
            self.face_parser(zeros(1, 3, PARSER_SIZE, PARSER_SIZE))
            if self.face_detector is not None:
                self.face_detector(zeros(1, 3, FACE_SIZE, FACE_SIZE))
        face = zeros(1, 3, FACE_SIZE, FACE_SIZE)
        if self.landmarker is not None:
            self.landmarker.warmup(face)
        self.latent_encoder.warmup(face, face)
        latents = zeros(1, self.unet.config.in_channels, LATENT_SIZE, LATENT_SIZE)
        self.generator.warmup(latents, zeros(1, self.token_count, self.audio_dim))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # Compilation and the graphs' warm-up runs (on side streams) leave cached blocks that
            # no request would reuse: give them back (11.5 GB reserved after start on the H100).
            torch.cuda.empty_cache()
        logger.info("warmup done in %.2f s", time.perf_counter() - started)


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; "auto" means cuda:0 when CUDA is available, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _require_files(models_dir: Path, detector: FaceDetector) -> None:
    """Raise WeightsError naming every file that `detector` needs and `models_dir` lacks."""
    missing = [f for f in needed_files(detector) if f.find(models_dir) is None]
    if missing:
        # S3FD and FAN are the files a machine without hub access cannot fetch: point at the way out.
        haar_hint = (
            " S3FD and 2DFAN4 are needed only with face.detector: s3fd (haar needs neither)."
            if any(f.key in FACE_NET_KEYS for f in missing)
            else ""
        )
        raise WeightsError(
            f"weights missing in {models_dir}: {', '.join(f.relpath for f in missing)}. "
            f"Fetch them with `{DOWNLOAD_COMMAND.format(dir=models_dir)}` "
            f"(or, for tests, `{RANDOM_COMMAND.format(dir=models_dir)}`).{haar_hint}"
        )


def _stored(key: str, models_dir: Path) -> Path:
    # _require_files ran first, so every layout file the detector needs is found.
    return weight_file(key).find(models_dir)


def _ready(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    module.requires_grad_(False)
    # nn.Module.to, not diffusers' override: that one warns about fp32-only modules on every dtype
    # cast even when the model has none (the list it prints is empty).
    return nn.Module.to(module, device=device, dtype=dtype).eval()


def _check_audio_dims(unet: UNet2DConditionModel, whisper: WhisperEncoder, models_dir: Path) -> None:
    if unet.config.cross_attention_dim != whisper.config.d_model:
        raise WeightsError(
            f"{weight_file('unet_config').path(models_dir)} has cross_attention_dim "
            f"{unet.config.cross_attention_dim} but {weight_file('whisper_config').path(models_dir)} has d_model "
            f"{whisper.config.d_model}: the UNet and the whisper encoder do not belong together."
        )
