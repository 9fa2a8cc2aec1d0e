"""What this host and this GPU can do at most, measured in the bench's own process, so that a
request's fps can be read against them (`benchmark.lipsync`).

- The encode ceiling: the host's encoders fed from memory. Frames of the request's output, held
  decoded in the pipe's format (yuv420p from the GPU compose path, bgr24 from the numpy one), are
  written by N threads into N `VideoEncoder`s at once (the pipeline's own encoder and arguments),
  one batch per write and nothing else per frame; N = 1, 2, 4, ... up to half the cores. The
  ceiling is the best total fps. Without a decoder, a GPU or Python beside them, this is what
  the host's encoders can do and no request can beat it.
- The GPU ceiling: the networks at the batch sizes a request runs them, alone, each timed over
  repeated calls with the device synchronised: the generator (UNet + VAE decode), and for a new
  video the VAE encoder and the face phase (S3FD on keyframes + FAN on every frame, as tracked).
  One GPU runs them one after another, so a request's GPU ceiling is its frames over the sum of
  their per-frame times for what it generated and prepared.

With random weights S3FD's boxes are random and would make the tracker re-detect every frame, a
cost real weights never pay: the face phase then replaces its boxes by a fixed face, as the face
bench does (`benchmark.faces.tracked_locator`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musetalk_service.benchmark.faces import tracked_locator
from musetalk_service.contract import LipsyncRequest
from musetalk_service.media.decode import VideoReader
from musetalk_service.media.encode import EncoderChoice, VideoEncoder
from musetalk_service.media.probe import probe_video
from musetalk_service.media.synth import talking_head_frames
from musetalk_service.nets.runtime import PREP_BATCH
from musetalk_service.pipeline.generate import generate_faces_tensor
from musetalk_service.pipeline.latents import FACE_SIZE, encode_crops
from musetalk_service.settings import FaceSettings

ENCODE_FRAMES = 250
"""Frames each encoder of the encode ceiling encodes (the held frames written again as often as
needed to reach it): 0.5-0.7 s for one libx264 at 1080p, long past x264's start."""
ENCODE_HELD_FRAMES = 250
"""Frames of the output held decoded for it (yuv420p 1080p: 0.78 GB)."""


def encoder_counts(cpu_count: int | None) -> list[int]:
    """1, 2, 4, ... up to half the cores (that count itself where it is not a power of two)."""
    most = max(1, (cpu_count or 1) // 2)
    counts = [1]
    while counts[-1] * 2 <= most:
        counts.append(counts[-1] * 2)
    if counts[-1] != most:
        counts.append(most)
    return counts


def held_frames(video: Path, pix_fmt: str, ffmpeg: str, count: int = ENCODE_HELD_FRAMES) -> tuple[np.ndarray, int, int, Fraction]:
    """Up to `count` frames of `video` decoded to `pix_fmt`: (frames, width, height, fps)."""
    info = probe_video(video)
    with VideoReader(video, info, ffmpeg=ffmpeg, pix_fmt=pix_fmt) as reader:
        frames = reader.read(count)  # leaving before the end kills (and reaps) the decoder
    if not len(frames):
        raise ValueError(f"{video}: no frames to measure the encoders with")
    return frames, info.width, info.height, info.fps


def encode_ceiling(
    frames: np.ndarray,
    width: int,
    height: int,
    fps: Fraction,
    choice: EncoderChoice,
    ffmpeg: str,
    pix_fmt: str,
    *,
    batch_size: int,
    work_dir: Path,
    cpu_count: int | None = None,
    frames_per_encoder: int = ENCODE_FRAMES,
) -> dict[str, Any]:
    """The encode ceiling (module docstring) for `choice` on `frames` (`[n, ...]` uint8 in
    `pix_fmt`, of `width`x`height`): per encoder count its total fps and the encoders' CPU per
    frame (core-ms, from the children's CPU time), and the best."""
    passes = -(-frames_per_encoder // len(frames))
    per_encoder = passes * len(frames)
    by_count: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="encode-ceiling-", dir=work_dir) as tmp:
        for n in encoder_counts(cpu_count if cpu_count is not None else os.cpu_count()):
            children_before = _children_cpu_s()
            started = time.perf_counter()
            with contextlib.ExitStack() as stack:
                encoders = [
                    stack.enter_context(VideoEncoder(Path(tmp) / f"enc{k}.mp4", width, height, fps, choice, ffmpeg, input_pix_fmt=pix_fmt))
                    for k in range(n)
                ]

                def feed(encoder: VideoEncoder) -> None:
                    for _ in range(passes):
                        for start in range(0, len(frames), batch_size):
                            encoder.write(frames[start : start + batch_size])
                    encoder.close()

                with ThreadPoolExecutor(max_workers=n, thread_name_prefix="encode-ceiling") as pool:
                    for done in [pool.submit(feed, encoder) for encoder in encoders]:
                        done.result()
            wall = time.perf_counter() - started
            encoded = n * per_encoder
            by_count[str(n)] = {
                "fps": round(encoded / wall, 1),
                "core_ms_per_frame": round(1000 * (_children_cpu_s() - children_before) / encoded, 2),
            }
    best = max(by_count, key=lambda n: by_count[n]["fps"])
    return {
        "encoder": choice.name,
        "args": " ".join(choice.args),
        "pix_fmt": pix_fmt,
        "size": f"{width}x{height}",
        "frames_per_encoder": per_encoder,
        "by_encoders": by_count,
        "best_encoders": int(best),
        "fps": by_count[best]["fps"],
    }


@dataclass(frozen=True)
class _Timed:
    seconds_per_call: float
    calls: int


def _time_calls(call: Callable[[], object], sync: Callable[[], None], min_seconds: float, *, warm_up: bool) -> _Timed:
    """Seconds per call of `call`, calls repeated until `min_seconds` have passed (at least one),
    the device synchronised after each; after one untimed call where `warm_up` (CUDA: allocations,
    cuDNN's kernel choice per shape)."""
    if warm_up:
        call()
        sync()
    calls = 0
    started = time.perf_counter()
    while True:
        call()
        calls += 1
        sync()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return _Timed(elapsed / calls, calls)


def gpu_ceiling(
    models: Any,
    face: FaceSettings,
    request: LipsyncRequest,
    size: tuple[int, int],
    fps: float | Fraction,
    *,
    min_seconds: float = 2.0,
) -> dict[str, Any]:
    """The GPU ceiling's parts (module docstring): per network its batch, calls timed, ms per
    call and per frame, and frames per second alone. Runs on `models.device` (the CPU in a CPU
    run: then it is the networks' ceiling there)."""
    device = torch.device(models.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gen_batch = models.generator.batch_size
    latents = torch.randn(gen_batch, models.unet.config.in_channels, 32, 32, device=device).to(models.dtype)
    audio = torch.randn(gen_batch, models.token_count, models.audio_dim, device=device).to(models.dtype)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (PREP_BATCH, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    frames = np.stack(list(talking_head_frames(PREP_BATCH, fps, size)))
    locator = tracked_locator(models, face, request, fps, frames[0])
    located = 0

    def locate() -> None:
        # Consecutive source indices, so each batch is tracked on from the last, as in a request.
        nonlocal located
        locator.locate(frames, range(located, located + len(frames)))
        located += len(frames)

    parts = {
        "generator": (gen_batch, lambda: generate_faces_tensor(models, latents, audio)),
        "vae_encoder": (PREP_BATCH, lambda: encode_crops(models, crops)),
        "face_phase": (PREP_BATCH, locate),
    }
    out: dict[str, Any] = {"device": str(device), "face_detector": locator.finder.name if locator.finder else None}
    for name, (batch, call) in parts.items():
        # On the CPU a call costs seconds and its first no more than the others: no untimed one.
        timed = _time_calls(call, sync, min_seconds, warm_up=device.type == "cuda")
        out[name] = {
            "batch": batch,
            "calls": timed.calls,
            "ms_per_call": round(1000 * timed.seconds_per_call, 3),
            "ms_per_frame": round(1000 * timed.seconds_per_call / batch, 4),
            "fps": round(batch / timed.seconds_per_call, 1),
        }
    return out


def gpu_ceiling_fps(gpu: dict[str, Any], frames: int, generated: int, prepared: int, detected: bool) -> float | None:
    """A request's GPU ceiling: `frames` over the GPU time of `generated` frames through the
    generator and (a new video) `prepared` source frames through the VAE encoder and, where
    `detected`, the face phase. None where it needs no GPU work at all."""
    ms = generated * gpu["generator"]["ms_per_frame"]
    if prepared:
        ms += prepared * (gpu["vae_encoder"]["ms_per_frame"] + (gpu["face_phase"]["ms_per_frame"] if detected else 0.0))
    return round(1000 * frames / ms, 1) if ms > 0 else None


def _children_cpu_s() -> float:
    """CPU seconds of this process's children that have been waited for (user + system)."""
    times = os.times()
    return times.children_user + times.children_system
