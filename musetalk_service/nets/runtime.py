"""The runtime policy of the networks: loading the bundle onto the chosen device (allocator
configuration, memory cap, compile cache), cheap questions for the service's probes and metrics,
and giving memory back between requests."""

from __future__ import annotations

import os

import torch

from musetalk_service.nets.bundle import ModelBundle
from musetalk_service.nets.fixed_batch import use_compile_cache
from musetalk_service.settings import Settings

PREP_BATCH = 32
"""Source frames per face-tracking run (FAN's batch; the VAE encoder's too), which the face and
latent networks are compiled for. Fixed, not the request's batch size: tracking places keyframes
per run, so the boxes (and the cache key) would otherwise depend on it. Runs start at multiples
of it from the video's first frame; only where a request's audio ends inside a run is that run
cut in two (its first part went out with the output)."""

ALLOCATOR_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
"""The variables that configure torch's CUDA allocator: every torch version reads the first, the
newer ones the second too."""


def load_models(settings: Settings, *, warm: bool = True) -> ModelBundle:
    """The networks as the service runs them: on the configured device, the per-batch ones at
    their fixed batch sizes, compiled and replayed as CUDA graphs where `settings.compile` says
    (with its disk cache); warmed up (compiled, graphs recorded) unless `warm` is False. With
    `face.detector: haar`, without S3FD and FAN."""
    device = settings.resolved_device()
    use_expandable_segments()
    cap_memory(device, settings.gpu_memory_gb)
    compile_mode = settings.compile.mode_for(device)
    if compile_mode is not None:
        use_compile_cache(settings.compile.cache_dir)
    models = ModelBundle.load(
        settings.models_dir, device,
        batch_size=settings.lipsync.batch_size, prepare_batch=PREP_BATCH, encode_batch=PREP_BATCH // 4,
        compile_mode=compile_mode,
        cuda_graphs=settings.compile.graphs_for(device), detector=settings.face.detector,
    )  # fmt: skip
    if warm:
        models.warmup()
    return models


def memory_bytes(device: torch.device) -> dict[str, int] | None:
    """Bytes torch has allocated and reserved on a CUDA device; None on the CPU.

    Read from the caching allocator's own counters: no CUDA call, so it answers even when the
    GPU does not (a metrics scrape must never hang).
    """
    if device.type != "cuda":
        return None
    return {
        "allocated": int(torch.cuda.memory_allocated(device)),
        "reserved": int(torch.cuda.memory_reserved(device)),
        "max_allocated": int(torch.cuda.max_memory_allocated(device)),
    }


def use_expandable_segments() -> None:
    """Have torch's CUDA allocator grow segments in place rather than cache fixed-size blocks,
    unless the operator configured the allocator (either variable of `ALLOCATOR_ENV`).

    Frames of 1080p batches, crops of varying counts and several streams fragment fixed blocks:
    measured on the H100 (2026-11-24, a 60 s new video), the most torch held during the request
    fell from 20.1 to 12.2 GB with expandable segments, at the same speed. Read when CUDA starts,
    so call it before the first CUDA allocation (model loading).
    """
    if not any(name in os.environ for name in ALLOCATOR_ENV):
        os.environ[ALLOCATOR_ENV[0]] = "expandable_segments:True"


def cap_memory(device: torch.device | str, limit_gb: float | None) -> None:
    """Hold at most `limit_gb` of GPU memory in this process (CUDA; None: no cap).

    torch's allocator caches freed blocks per stream, so what it holds runs well above what is
    alive: on the H100 (2026-11-24) a new 1080p video peaked at 4.4-5.1 GB of live tensors but
    7.9-8.7 GB held. Under a cap, an allocation that would pass it first makes the allocator
    give its cached blocks back and try again; only live tensors beyond the cap raise
    `torch.OutOfMemoryError`.
    """
    device = torch.device(device)
    if device.type != "cuda" or limit_gb is None:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gb * 2**30 / total), device)


def release_cached_memory(device: torch.device) -> None:
    """Give the blocks torch's caching allocator keeps but no tensor uses back to the driver.

    Called when a request ends. The allocator caches freed blocks per CUDA stream, and each
    request's side streams (face work, compose) come from torch's round-robin pool, so a later
    request rarely reuses them: measured on the H100 (2026-11-24), reserved memory grew by about
    10 GB per new video until 62 GB, while the tensors alive never passed 4.4 GB. The GPU is
    shared with a TTS model, so what a request no longer needs goes back. The next request's
    allocations cost some milliseconds more; the CUDA graphs' memory is not cached blocks and stays.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()


def answers(device: torch.device) -> bool:
    """Run a tiny op on the device and wait for its result; True on the CPU.

    On CUDA it runs on a side stream from torch's pool (non-blocking with the default stream, so
    it does not queue behind a running job's kernels). A GPU that has stopped answering blocks
    here: call it from a thread with a timeout.
    """
    if device.type != "cuda":
        return True
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.stream(stream):
        value = (torch.ones(1, device=device) + 1).item()
    return value == 2.0
