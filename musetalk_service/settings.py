"""One typed settings object, loaded once at the entry point.

Precedence, highest first: explicit overrides (CLI flags), environment variables
(`MUSETALK_<FIELD>`, nested with `__`, e.g. `MUSETALK_ENCODE__X264_PRESET=fast`), the YAML file
(`--config`, else `MUSETALK_CONFIG`, else `configs/default.yaml` of this checkout), then the
defaults below. A bad value fails at start with pydantic's message naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"

ParsingMode = Literal["raw", "jaw", "neck"]


class EncodeSettings(BaseModel):
    """How composed frames become H.264."""

    encoder: Literal["auto", "h264_nvenc", "libx264"] = Field(
        "auto", description="auto: probe h264_nvenc at start (open it on a tiny clip), else libx264."
    )
    nvenc_preset: str = "p4"
    nvenc_cq: int = Field(20, ge=0, le=51)
    x264_preset: str = "veryfast"
    x264_crf: int = Field(18, ge=0, le=51)
    ffmpeg_path: str | None = Field(
        None, description="ffmpeg binary; unset: ffmpeg on PATH, else the one imageio-ffmpeg ships."
    )


class LipsyncDefaults(BaseModel):
    """Per-request options' defaults (a request may override each)."""

    batch_size: int = Field(16, ge=1, le=256, description="Frames per UNet/VAE batch.")
    bbox_shift: int = Field(0, ge=-100, le=100, description="Pixels added to the nose point's y; 0 for v1.5.")
    extra_margin: int = Field(10, ge=0, le=100, description="Pixels added below the chin (v1.5 crop rule).")
    parsing_mode: ParsingMode = "jaw"
    left_cheek_width: int = Field(90, ge=0, le=256)
    right_cheek_width: int = Field(90, ge=0, le=256)
    mask_every: int = Field(5, ge=1, le=1000, description="Recompute the face-parsing mask every N source frames.")


class Settings(BaseSettings):
    """Everything the service reads from configs/ and the environment."""

    model_config = SettingsConfigDict(env_prefix="MUSETALK_", env_nested_delimiter="__", extra="forbid")

    models_dir: Path = Field(Path("models"), description="The weights folder (layout in models/README.md).")
    device: str = Field("auto", description="auto: cuda:0 when CUDA is available, else cpu.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    work_dir: Path | None = Field(None, description="Where per-request temp files go; unset: the system temp dir.")
    output_dir: Path = Field(Path("outputs"), description="Where outputs go when a request names no output_path.")
    log_level: str = "INFO"
    encode: EncodeSettings = EncodeSettings()
    lipsync: LipsyncDefaults = LipsyncDefaults()

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
