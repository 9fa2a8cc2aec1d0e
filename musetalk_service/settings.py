"""One typed settings object, loaded once at the entry point.

Precedence, highest first: explicit overrides (CLI flags), environment variables
(`MUSETALK_<FIELD>`, nested with `__`, e.g. `MUSETALK_ENCODE__X264_PRESET=fast`), the YAML file
(`--config`, else `MUSETALK_CONFIG`, else `configs/default.yaml` of this checkout), then the
defaults below. A bad value fails at start with pydantic's message naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"

ParsingMode = Literal["raw", "jaw", "neck"]
SilenceMode = Literal["generate", "source"]


class EncodeSettings(BaseModel):
    """How composed frames become H.264."""

    encoder: Literal["auto", "h264_nvenc", "libx264"] = Field(
        "auto", description="auto: probe h264_nvenc at start (open it on a tiny clip), else libx264."
    )
    nvenc_preset: str = "p4"
    nvenc_cq: int = Field(20, ge=0, le=51)
    # superfast at crf 22 rather than veryfast at 18: about the same size and quality (SSIM, PSNR
    # on a talking head, clean and with grain) for 40-50 % less CPU, and x264's CPU is what bounds
    # a warm request on a GPU host without NVENC (docs/benchmarks.md, session 6).
    x264_preset: str = "superfast"
    x264_crf: int = Field(22, ge=0, le=51)
    profile: Literal["standard", "intermediate"] = Field(
        "standard",
        description="standard: libx264 at x264_preset. intermediate, for platforms that re-encode the output "
        "anyway: libx264 at intermediate_x264_preset, same crf (the quality is kept, the file is larger; "
        "docs/benchmarks.md has its size and speed). NVENC is the same in both.",
    )
    intermediate_x264_preset: str = Field("ultrafast", description="libx264's preset under profile: intermediate.")
    ffmpeg_path: str | None = Field(
        None, description="ffmpeg binary; unset: ffmpeg on PATH, else the one imageio-ffmpeg ships."
    )
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto",
        description="ffmpeg encoders running in parallel on consecutive segments, joined without "
        "re-encoding; auto: by frame size, pipe format and cores (GPU compose, yuv420p: 1 at 1080p, 4 at 4K; "
        "numpy compose, bgr24: 4 at 1080p on 8+ cores; 1 on 2 cores).",
    )
    segment_frames: int = Field(250, ge=16, description="Frames per segment when workers > 1 (x264's keyframe interval).")


class LipsyncDefaults(BaseModel):
    """Per-request options' defaults (a request may override each)."""

    batch_size: int = Field(16, ge=1, le=256, description="Frames per UNet/VAE batch.")
    bbox_shift: int = Field(0, ge=-100, le=100, description="Pixels added to the nose point's y; 0 for v1.5.")
    extra_margin: int = Field(10, ge=0, le=100, description="Pixels added below the chin (v1.5 crop rule).")
    parsing_mode: ParsingMode = "jaw"
    left_cheek_width: int = Field(90, ge=0, le=256)
    right_cheek_width: int = Field(90, ge=0, le=256)
    mask_every: int = Field(5, ge=1, le=1000, description="Recompute the face-parsing mask every N source frames.")
    silence: SilenceMode = Field(
        "generate",
        description="Frames whose audio is silent: `generate` a mouth as for speech, or show the `source` video's "
        "frame as it is (its resting mouth; no UNet, VAE decode or blend for them), cross-faded at each boundary "
        "(thresholds in `silence.*`).",
    )


class SilenceSettings(BaseModel):
    """How `silence: source` finds silence in the speech track (pipeline/silence.py)."""

    min_silence_s: float = Field(0.3, ge=0, le=10, description="Shorter silences keep generating (pauses between words).")
    fade_frames: int = Field(4, ge=0, le=50, description="Frames of cross-fade from the generated mouth to the source's at each boundary.")
    threshold_db: float = Field(-40.0, ge=-90, le=0, description="Speech: louder than the track's own level (95th percentile) plus this.")
    hysteresis_db: float = Field(6.0, ge=0, le=30, description="Speech ends only this far below where it starts.")
    floor_dbfs: float = Field(-60.0, ge=-120, le=0, description="Quieter than this is silence whatever the track's level.")


class SmoothingSettings(BaseModel):
    """One-Euro smoothing of the crop boxes (see pipeline/tracking.py for how they were tuned)."""

    enabled: bool = True
    min_cutoff: float = Field(0.2, gt=0, description="Hz; cutoff while the head is still (lower is steadier).")
    beta: float = Field(15.0, ge=0, description="How fast the cutoff opens with head speed.")
    d_cutoff: float = Field(1.0, gt=0, description="Hz; cutoff of the speed estimate.")
    speed_floor: float = Field(0.1, ge=0, description="Face sizes/s taken for detector noise.")
    hold_px: float = Field(0.8, ge=0, description="Dead band when rounding boxes to pixels.")
    jump_iou: float = Field(0.1, ge=0, le=1, description="A box overlapping the last less than this restarts the filter.")


class FaceSettings(BaseModel):
    """How faces are found and followed."""

    detector: Literal["s3fd", "haar"] = Field(
        "s3fd",
        description="s3fd: S3FD + FAN 68 landmarks (weights in models/). haar: OpenCV's shipped Haar "
        "cascade, no downloaded weights, coarser geometry, frontal faces only.",
    )
    detect_every: int = Field(5, ge=1, le=250, description="Run the detector every N frames; boxes in between are tracked.")
    detect_max_side: int = Field(640, ge=64, le=4096, description="Frames are shrunk to this longer side for detection.")
    smoothing: SmoothingSettings = SmoothingSettings()


class CompileSettings(BaseModel):
    """torch.compile for the per-batch networks (UNet + VAE decoder, VAE encoder, FAN)."""

    enabled: bool | Literal["auto"] = Field(
        "auto", description="auto: on CUDA (minutes the first time, seconds with a warm cache), off on CPU."
    )
    mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode; see docs/benchmarks.md for what each measured."
    )
    cuda_graphs: bool = Field(
        True,
        description="Replay the compiled UNet + VAE decoder and FAN as CUDA graphs recorded at warm-up (CUDA "
        "only): one launch per batch instead of one per kernel.",
    )
    cache_dir: Path = Field(
        Path("~/.cache/musetalk-service/torch-compile"),
        description="Inductor's cache (TORCHINDUCTOR_CACHE_DIR wins): keep it across restarts for a quick start.",
    )

    def mode_for(self, device: str) -> str | None:
        """The compile mode to use on `device`, None for eager."""
        on = device.startswith("cuda") if self.enabled == "auto" else self.enabled
        return self.mode if on else None

    def graphs_for(self, device: str) -> bool:
        """Whether the compiled networks replay CUDA graphs on `device`."""
        return self.cuda_graphs and self.mode_for(device) is not None and device.startswith("cuda")


class JobSettings(BaseModel):
    """The queue in front of the GPU."""

    max_queue: int = Field(8, ge=1, le=10000, description="Jobs waiting for the GPU; beyond it, 429.")
    keep_finished_s: float = Field(3600, ge=0, description="How long a finished job stays readable.")
    time_limit_s: float | None = Field(1800, gt=0, description="Per-job limit from submission; null: none.")
    shutdown_mode: Literal["finish", "cancel"] = Field("finish", description="What SIGTERM does to the running job.")
    shutdown_timeout_s: float = Field(120, ge=0, description="How long shutdown waits for the running job.")


class LimitSettings(BaseModel):
    """Input limits; each breach is a clear 4xx."""

    max_upload_bytes: int = Field(2 * 1024**3, ge=1, description="Largest multipart upload.")
    max_video_seconds: float = Field(1800, gt=0)
    max_audio_seconds: float = Field(1800, gt=0)
    max_pixels: int = Field(3840 * 2160, ge=1, description="Largest frame (width x height).")
    max_frames: int = Field(100_000, ge=1, description="Most output frames one request may ask for.")


class CacheSettings(BaseModel):
    """The avatar cache: a video seen before (same content, same preprocessing options) reuses its
    face boxes, latents and blend masks."""

    enabled: bool = True
    dir: Path | None = Field(None, description="Folder for avatars on disk; unset: memory only.")
    max_memory_mb: int = Field(2048, ge=0, description="Avatars kept in memory (LRU), in MB.")
    max_disk_mb: int = Field(20480, ge=0, description="Avatars kept on disk (LRU), in MB.")


class UrlSettings(BaseModel):
    """Media, outputs and callbacks by URL (`video_url`, `audio_url`, `output_url`, `callback_url`)."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a URL may name: `host` exactly, or `*.example.com` for its subdomains. Empty: every "
        "URL field is refused (400 url_not_allowed).",
    )
    connect_timeout_s: float = Field(10, gt=0, description="Connecting to a source, an upload target or a callback.")
    read_timeout_s: float = Field(60, gt=0, description="The longest silence between two chunks of a transfer.")
    upload_attempts: int = Field(4, ge=1, le=20, description="Tries of the output PUT (connection errors, 408, 429, 5xx).")
    callback_attempts: int = Field(5, ge=1, le=20, description="Tries of the callback POST until it answers 2xx.")
    retry_backoff_s: float = Field(1.0, ge=0, description="Wait before the second try; doubled before each later one.")
    callback_secret: str | None = Field(
        None, description="When set, each callback carries `X-MuseTalk-Signature: sha256=<HMAC-SHA256 of the body>`."
    )


class RaySettings(BaseModel):
    """Ray Serve mode (`serve --ray`): the engine deployment's replicas and what each reserves."""

    engine_replicas: int = Field(1, ge=1, le=1024, description="Engine replicas: one per GPU (each loads every network).")
    gpus_per_replica: float | Literal["auto"] = Field(
        "auto", description="GPUs each replica reserves; auto: 1 where the cluster has GPUs, else 0 (CPU replicas)."
    )
    cpus_per_replica: float = Field(4, gt=0, description="CPU cores each engine replica reserves: decode, blend and libx264 run on them.")
    ingress_cpus: float = Field(1, ge=0, description="CPU cores the HTTP ingress reserves (it runs no model).")
    app_name: str = Field("musetalk", min_length=1, description="The Serve application's name (`serve --ray`; a `serve run` config names its own).")
    health_check_period_s: float = Field(10, gt=0, description="How often Ray asks each replica's device a tiny op.")
    health_check_timeout_s: float = Field(30, gt=0, description="A replica whose device does not answer within this is replaced.")


class Settings(BaseSettings):
    """Everything the service reads from configs/ and the environment."""

    model_config = SettingsConfigDict(env_prefix="MUSETALK_", env_nested_delimiter="__", extra="forbid")

    models_dir: Path = Field(Path("models"), description="The weights folder (layout in models/README.md).")
    device: str = Field("auto", description="auto: cuda:0 when CUDA is available, else cpu.")
    gpu_memory_gb: float | None = Field(
        8.0,
        gt=0,
        description="The most GPU memory torch may hold (CUDA; null: no cap). At the cap torch first "
        "gives back the blocks it caches; only a request whose live tensors need more fails "
        "(gpu_memory_exhausted). The platform shares the GPU with its TTS.",
    )
    compose: Literal["auto", "device", "numpy"] = Field(
        "auto",
        description="Where generated faces are blended into the frames. device: torch on the model "
        "device, handing the encoder yuv420p; numpy: on the CPU (the fallback). auto: device on "
        "CUDA, numpy on CPU (faster there than torch's CPU kernels).",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    work_dir: Path | None = Field(None, description="Where per-request temp files go; unset: the system temp dir.")
    output_dir: Path = Field(Path("outputs"), description="Where outputs go when a request names no output_path.")
    log_level: str = "INFO"
    input_roots: list[Path] = Field(default_factory=list, description="Inputs must resolve under one of these; empty: anywhere.")
    output_roots: list[Path] = Field(default_factory=list, description="Outputs must resolve under one of these; empty: anywhere.")
    api_key: str | None = Field(None, description="When set, every route but the liveness probe needs header X-API-Key.")
    encode: EncodeSettings = EncodeSettings()
    lipsync: LipsyncDefaults = LipsyncDefaults()
    silence: SilenceSettings = SilenceSettings()
    face: FaceSettings = FaceSettings()
    compile: CompileSettings = CompileSettings()
    jobs: JobSettings = JobSettings()
    limits: LimitSettings = LimitSettings()
    cache: CacheSettings = CacheSettings()
    urls: UrlSettings = UrlSettings()
    ray: RaySettings = RaySettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_path = _config_path()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
        return tuple(sources)

    def resolved_device(self) -> str:
        """The torch device string this process should use."""
        if self.device != "auto":
            return self.device
        import torch  # local: settings must import without torch for media-only tools

        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def composes_on_device(self, device: str) -> bool:
        """Whether frames are composed with torch on `device` (the model device) rather than numpy."""
        return device.startswith("cuda") if self.compose == "auto" else self.compose == "device"


_config_override: Path | None = None


def _config_path() -> Path | None:
    path = _config_override or (Path(os.environ["MUSETALK_CONFIG"]) if os.environ.get("MUSETALK_CONFIG") else None)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return path
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings: `config` is a YAML file; `overrides` win over everything (CLI flags)."""
    global _config_override
    _config_override = Path(config) if config is not None else None
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _config_override = None
