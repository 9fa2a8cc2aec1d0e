"""End-to-end benchmark: the real pipeline on a long synthetic talking-head input.

It builds its own input (a talking-head video with head motion and speech-like audio, lengths and
size as options), loads the pipeline as `serve` does (timing start-to-ready), then runs requests:

- `cold`: a video the service has not seen: its avatar is prepared (face detection, VAE encode,
  parsing masks), then the lip-sync runs;
- `warm`: the same video again with the same options: the cached avatar is reused;
- `face_box`: a new preparation with the face box given (templated avatars skip detection);
- `silence30`: the warm request (run it after `cold` or `warm`) with `silence: source` on a track
  that is 30 % digital silence (`synth.speech_with_silences`): frames generated and silent, and
  its fps over the `warm` run's (`speedup_vs_warm`), the GPU work the silence saves.

With random weights S3FD's boxes are random too (the face phase's cost is real, its boxes are
not), so `face_box` is the closest to a real new video's blend and crop sizes.

For each it records wall time, output fps, per-phase busy seconds, GPU memory (the peak of
tensors alive, and the peak and the after-request amount torch holds from the driver, CUDA graph
pools and cached blocks included: what another process on the GPU cannot have), how busy the
host's cores were, host RSS (before the request, its peak during it, and the process's peak since
start), the encoder, the device and the commit. With random weights the mouths are meaningless but every FLOP is real,
so the speed is too.

- `warm_intermediate` (not run unless asked for): the warm request with the encoder of
  `encode.profile: intermediate` (a faster x264 preset, for platforms that re-encode anyway).

After the runs the bench measures its own ceilings on the same host, frames and models
(`benchmark.ceilings`, nothing else running): the host's encode ceiling (the best total fps of
1, 2, 4, ... parallel encoders fed frames of the output from memory, per encode profile run) and
the GPU ceiling (the generator, and for a new video the VAE encoder and the face phase, at the
batch sizes in use). Each run then gets `ceiling` (the lower of the two for what the run did) and
`fps_over_ceiling`, its CPU cost (`cpu`: core-ms per output frame of this process, of its ffmpeg
children and of the whole host, and each stage's busy ms per frame) and how busy the GPU thread
was (`gpu_thread_busy_share`, and NVML's utilisation where pynvml is installed).

Each run also gets a verdict (`verdict`): the stage that bounds it, its fps against its ceiling,
and against the service's targets (`TARGET_FPS`, `TARGET_GPU_HELD_GB`: one H100, 1080p 25 fps)
whether it met them and by how much it missed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import resource
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from musetalk_service.benchmark import EXTRA_RUNS, RUNS
from musetalk_service.benchmark.ceilings import encode_ceiling, gpu_ceiling, gpu_ceiling_fps, held_frames
from musetalk_service.media.encode import EncoderChoice, choose_encoder
from musetalk_service.media.ffmpeg import find_ffmpeg
from musetalk_service.media.synth import speech_with_silences, write_audio, write_speech_like_audio, write_talking_head_video
from musetalk_service.contract import LipsyncRequest
from musetalk_service.nets.runtime import release_cached_memory
from musetalk_service.pipeline.runner import LipsyncPipeline
from musetalk_service.settings import REPO_ROOT, Settings

log = logging.getLogger(__name__)

SILENT_SHARE = 0.3
"""Of the `silence30` run's track."""

TARGET_FPS = {"cold": 150.0, "warm": 250.0}
"""Output frames per second the service aims at on one H100 at 1080p 25 fps (issue 4): a new
video, detection included, and a video seen before (its avatar cached)."""
TARGET_GPU_HELD_GB = 8.0
"""The most GPU memory torch may hold during a request: the platform shares the GPU with its TTS."""

STAGES = (
    ("decoder thread (read)", ("read",)),
    ("face thread (face_detect)", ("face_detect",)),
    ("GPU thread (vae_encode + unet)", ("vae_encode", "unet")),
    ("writer thread (parse + blend + encode)", ("parse", "blend", "encode")),
    ("after the last frame (mux)", ("mux",)),
)
"""The request's stages, each the phases whose busy time it spends (pipeline/flow.py runs the
first four at once; the mux follows them). A stage busy for most of the wall time bounds it;
`encode` is the writer waiting for ffmpeg to take the frames, so it stands for the encoder."""
GPU_THREAD_PHASES = ("vae_encode", "unet")
"""The GPU thread's phases, each timed until the device finished its work."""


def run_lipsync_bench(
    settings: Settings,
    work_dir: Path,
    *,
    seconds: float = 120.0,
    video_seconds: float | None = None,
    size: tuple[int, int] = (1920, 1080),
    fps: int = 25,
    runs: tuple[str, ...] = RUNS,
    ceiling_seconds: float = 2.0,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Build the input under `work_dir`, load the pipeline, run each of `runs`, measure the
    ceilings (each network timed for at least `ceiling_seconds`); return the report.
    `checkpoint` is handed the report as it stands after each run and at the end (a bench cut
    off by a time limit keeps what it measured)."""
    unknown = [name for name in runs if name not in RUNS + EXTRA_RUNS]
    if unknown:
        raise ValueError(f"unknown bench runs {unknown}: choose from {', '.join(RUNS + EXTRA_RUNS)}")
    work_dir.mkdir(parents=True, exist_ok=True)
    video_seconds = seconds if video_seconds is None else video_seconds
    width, height = size
    ffmpeg = find_ffmpeg(settings.encode.ffmpeg_path)
    started = time.perf_counter()
    video = write_talking_head_video(
        work_dir / f"bench_{width}x{height}_{video_seconds:g}s.mp4", video_seconds, fps, size, ffmpeg=ffmpeg
    )
    audio = write_speech_like_audio(work_dir / f"bench_{seconds:g}s.wav", seconds, ffmpeg=ffmpeg)
    silent_audio = (
        write_audio(work_dir / f"bench_{seconds:g}s_silence30.wav", speech_with_silences(seconds, SILENT_SHARE), ffmpeg=ffmpeg)
        if "silence30" in runs
        else None
    )
    input_s = time.perf_counter() - started

    started = time.perf_counter()
    pipeline = LipsyncPipeline.load(settings)
    ready_s = time.perf_counter() - started

    # The astronaut's face sits in the middle third of the synthetic frames (media.synth).
    face_box = (int(width * 0.40), int(height * 0.22), int(width * 0.60), int(height * 0.70))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": _device_name(pipeline),
        "commit": _commit(),
        "weights": pipeline.models.weights_kind,
        "encoder": pipeline.encoder.name,
        "encoder_args": " ".join(pipeline.encoder.args),
        "cpu_count": os.cpu_count(),
        "input": {"size": f"{width}x{height}", "fps": fps, "audio_s": seconds, "video_s": video_seconds},
        "input_build_s": round(input_s, 2),
        "start_to_ready_s": round(ready_s, 2),
        # What the loaded, warmed models hold on the GPU between requests (weights, CUDA graphs).
        "gpu_reserved_ready_gb": _gb(torch.cuda.memory_reserved(pipeline.models.device))
        if pipeline.models.device.type == "cuda"
        else None,
        "runs": {},
    }
    base = LipsyncRequest.with_defaults(settings.lipsync, video_path=video, audio_path=audio, output_path=work_dir / "out.mp4")
    encoders = {"standard": pipeline.encoder}
    if "warm_intermediate" in runs:
        encoders["intermediate"] = choose_encoder(settings.encode.model_copy(update={"profile": "intermediate"}), ffmpeg)
    outputs: dict[str, Path] = {}
    for name in runs:
        outputs[name] = work_dir / f"out_{name}.mp4"
        request = replace(base, output_path=outputs[name])
        if name == "face_box":
            request = replace(request, face_box=face_box)
        elif name == "silence30":
            request = replace(request, audio_path=silent_audio, silence="source")
        profile = "intermediate" if name == "warm_intermediate" else "standard"
        report["runs"][name] = run = _timed_run(_with_encoder(pipeline, encoders[profile]), request)
        run["encode_profile"] = profile
        run["encoder_args"] = " ".join(encoders[profile].args)
        run["verdict"] = verdict(name, run)
        log.info("bench %s: %s", name, json.dumps(report["runs"][name]))
        if checkpoint is not None:
            checkpoint(report)
    if "silence30" in report["runs"] and "warm" in report["runs"]:
        silent, warm = report["runs"]["silence30"], report["runs"]["warm"]
        silent["speedup_vs_warm"] = round(silent["output_fps"] / warm["output_fps"], 2) if warm["output_fps"] else None

    # The ceilings, with nothing else running: the encoders on frames of the warm run's output
    # (else the first run's), in the pipe format the pipeline feeds them; the networks alone.
    if runs:
        started = time.perf_counter()
        pix_fmt = "yuv420p" if settings.composes_on_device(str(pipeline.models.device)) else "bgr24"
        frames, out_w, out_h, out_fps = held_frames(outputs.get("warm", outputs[runs[0]]), pix_fmt, ffmpeg)
        report["ceilings"] = ceilings = {
            "encode": {
                profile: encode_ceiling(
                    frames, out_w, out_h, out_fps, choice, ffmpeg, pix_fmt, batch_size=base.batch_size, work_dir=work_dir
                )
                for profile, choice in encoders.items()
            },
        }
        del frames
        ceilings["gpu"] = gpu_ceiling(pipeline.models, settings.face, base, size, fps, min_seconds=ceiling_seconds)
        release_cached_memory(pipeline.models.device)
        ceilings["measured_s"] = round(time.perf_counter() - started, 2)
        log.info("bench ceilings: %s", json.dumps(ceilings))
        video_frames = round(video_seconds * fps)
        for name, run in report["runs"].items():
            run.update(run_ceiling(run, ceilings, video_frames))
            run["verdict"] = verdict(name, run)
    if checkpoint is not None:
        checkpoint(report)
    return report


def _with_encoder(pipeline: LipsyncPipeline, choice: EncoderChoice) -> LipsyncPipeline:
    """`pipeline` writing with `choice`: the same models and avatar cache (so a warm run stays warm)."""
    if choice == pipeline.encoder:
        return pipeline
    other = copy.copy(pipeline)
    other.encoder = choice
    return other


def run_ceiling(run: dict, ceilings: dict, video_frames: int) -> dict[str, Any]:
    """A run's `ceiling` and its fps over it (and over each ceiling): the encode ceiling of its
    encode profile, and the GPU ceiling of the work it did (its generated frames; for a new
    video, which a run shows by its VAE-encode busy time, the video's `video_frames` encoded and,
    where its face phase ran, located)."""
    phases = run["phases_s"]
    encode_fps = ceilings["encode"][run["encode_profile"]]["fps"]
    prepared = video_frames if phases.get("vae_encode", 0) > 0 else 0
    gpu_fps = gpu_ceiling_fps(ceilings["gpu"], run["frames"], run["frames_generated"], prepared, phases.get("face_detect", 0) > 0)
    lowest = encode_fps if gpu_fps is None else min(encode_fps, gpu_fps)
    fps = run["output_fps"]
    return {
        "ceiling": {"fps": lowest, "by": "encode" if lowest == encode_fps else "gpu", "encode_fps": encode_fps, "gpu_fps": gpu_fps},
        "fps_over_ceiling": round(fps / lowest, 3),
        "fps_over_encode_ceiling": round(fps / encode_fps, 3),
        "fps_over_gpu_ceiling": round(fps / gpu_fps, 3) if gpu_fps else None,
    }


def _timed_run(pipeline: LipsyncPipeline, request: LipsyncRequest) -> dict:
    cuda = pipeline.models.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(pipeline.models.device)
    rss_before = _rss_bytes()
    cpu_before = _cpu_ticks()
    own_before = _own_cpu_s()
    started = time.perf_counter()
    with _RunSampler(pipeline.models.device) as sampled:
        result = pipeline.run(request)
    wall = time.perf_counter() - started
    own_after = _own_cpu_s()
    cpu_after = _cpu_ticks()
    host_busy = _busy_share(cpu_before, cpu_after)
    return {
        "frames": result.frames,
        "wall_s": round(wall, 2),
        "output_fps": round(result.frames / wall, 1),
        "realtime_factor": round(result.duration_s / wall, 2),
        "phases_s": result.timings,
        "frames_without_face": result.frames_without_face,
        "frames_generated": result.frames_generated,
        "frames_silent": result.frames_silent,
        "avatar_id": result.avatar_id,
        "fallbacks": result.fallbacks,
        "gpu_memory_peak_gb": _gb(torch.cuda.max_memory_allocated(pipeline.models.device)) if cuda else None,
        "gpu_reserved_peak_gb": _gb(torch.cuda.max_memory_reserved(pipeline.models.device)) if cuda else None,
        "gpu_reserved_after_gb": _gb(torch.cuda.memory_reserved(pipeline.models.device)) if cuda else None,
        "host_cpu_busy": host_busy,
        "cpu": _cpu_cost(result.frames, wall, result.timings, own_before, own_after, host_busy),
        "gpu_thread_busy_share": round(sum(result.timings.get(p, 0.0) for p in GPU_THREAD_PHASES) / wall, 3),
        "gpu_utilization_nvml": sampled.gpu_utilization,
        # The process's peak since it started (model loading and compilation included), and the
        # resident memory before and at its highest during this request: what the request adds.
        "host_rss_peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "host_rss_before_gb": _gb(rss_before),
        "host_rss_run_peak_gb": _gb(sampled.peak),
    }


def _own_cpu_s() -> tuple[float, float, float]:
    """CPU seconds so far: this process's, its waited-for children's (the ffmpegs), the calling
    thread's (the request's GPU thread)."""
    times = os.times()
    return times.user + times.system, times.children_user + times.children_system, time.thread_time()


def _cpu_cost(
    frames: int, wall: float, phases: dict[str, float], before: tuple[float, float, float], after: tuple[float, float, float],
    host_busy: float | None,
) -> dict[str, Any]:  # fmt: skip
    """Core-milliseconds of CPU per output frame between two `_own_cpu_s` readings: this process
    and its ffmpeg children (total and each), the GPU thread alone, the whole host (all its
    processes: `host_busy` of its cores over `wall`); and each stage's busy ms per frame (wall
    time, not CPU: how long each frame holds that stage)."""
    process, children, gpu_thread = ((a - b) * 1000 / frames for a, b in zip(after, before))
    host = None if host_busy is None else host_busy * (os.cpu_count() or 1) * wall * 1000 / frames
    return {
        "core_ms_per_frame": round(process + children, 2),
        "process_core_ms_per_frame": round(process, 2),
        "ffmpeg_core_ms_per_frame": round(children, 2),
        "gpu_thread_core_ms_per_frame": round(gpu_thread, 2),
        "host_core_ms_per_frame": None if host is None else round(host, 2),
        "stage_busy_ms_per_frame": {
            stage: round(sum(phases.get(p, 0.0) for p in parts) * 1000 / frames, 3) for stage, parts in STAGES
        },
    }


def verdict(name: str, run: dict) -> dict:
    """Which stage bounds `run` (a `_timed_run` result named `name`), and how it fares against the
    targets: `bound_by` and its busy seconds and share of the wall time; where `name` has a
    target, `target_fps`, `met`, and `bound_over_target_s`: how much longer that stage alone is
    busy than the target allows the whole request (negative: the stage fits, and what is missing
    is overlap and the serial parts); `gpu_held_met` where the GPU was measured. Once the bench
    has measured its ceilings (`run_ceiling`): `ceiling_fps`, `ceiling_by` (`encode` or `gpu`)
    and `fps_over_ceiling`; with the run's CPU cost, `core_ms_per_frame` and
    `gpu_thread_busy_share`."""
    phases, wall = run["phases_s"], run["wall_s"]
    busy = {stage: round(sum(phases.get(p, 0.0) for p in parts), 2) for stage, parts in STAGES}
    bound = max(busy, key=busy.get)
    out = {"bound_by": bound, "bound_busy_s": busy[bound], "bound_share_of_wall": round(busy[bound] / wall, 2) if wall else None}
    if "ceiling" in run:
        out.update(ceiling_fps=run["ceiling"]["fps"], ceiling_by=run["ceiling"]["by"], fps_over_ceiling=run["fps_over_ceiling"])
    if "cpu" in run:
        out.update(core_ms_per_frame=run["cpu"]["core_ms_per_frame"], gpu_thread_busy_share=run["gpu_thread_busy_share"])
    target = TARGET_FPS.get(name)
    if target is not None:
        allowed = run["frames"] / target
        out.update(target_fps=target, met=run["output_fps"] >= target, bound_over_target_s=round(busy[bound] - allowed, 2))
    if run.get("gpu_reserved_peak_gb") is not None:
        out["gpu_held_met"] = run["gpu_reserved_peak_gb"] <= TARGET_GPU_HELD_GB
    return out


def describe_verdict(name: str, run: dict) -> str:
    """`verdict`, in a line."""
    v = verdict(name, run)
    line = f"bound by the {v['bound_by']}, busy {v['bound_busy_s']} s of {run['wall_s']} s"
    if "target_fps" in v:
        allowed = round(run["frames"] / v["target_fps"], 2)
        if v["met"]:
            line += f"; target {v['target_fps']:g} fps met"
        elif v["bound_over_target_s"] > 0:
            line += (
                f"; target {v['target_fps']:g} fps missed: that stage alone takes {v['bound_over_target_s']} s "
                f"more than the {allowed} s the target allows"
            )
        else:
            line += (
                f"; target {v['target_fps']:g} fps missed by {round(run['wall_s'] - allowed, 2)} s of wall time, "
                "though every stage fits in it: overlap and the serial parts lose it"
            )
    if "ceiling_fps" in v:
        ceiling = run["ceiling"]
        gpu = "no GPU work" if ceiling["gpu_fps"] is None else f"GPU {ceiling['gpu_fps']:g} fps"
        line += (
            f"; {run['output_fps']:g} fps is {v['fps_over_ceiling']:.2f} of its ceiling {v['ceiling_fps']:g} fps "
            f"(encode {ceiling['encode_fps']:g} fps, {gpu}: the {'encoders' if v['ceiling_by'] == 'encode' else 'GPU'} bound it)"
        )
    if "core_ms_per_frame" in v:
        cpu = run["cpu"]
        line += (
            f"; CPU {v['core_ms_per_frame']:g} core-ms a frame (this process {cpu['process_core_ms_per_frame']:g}, "
            f"ffmpeg {cpu['ffmpeg_core_ms_per_frame']:g}; the host {cpu['host_core_ms_per_frame']}), "
            f"GPU thread busy {v['gpu_thread_busy_share']:.2f} of the wall"
        )
    if "gpu_held_met" in v:
        line += f"; GPU held {run['gpu_reserved_peak_gb']} GB ({'within' if v['gpu_held_met'] else 'over'} {TARGET_GPU_HELD_GB:g} GB)"
    return line


def _gb(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**30, 2)


def _rss_bytes() -> int | None:
    """This process's resident memory now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_ticks() -> tuple[int, int] | None:
    """(all, idle) CPU time of the whole host since boot, in ticks (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(ticks), ticks[3] + ticks[4]  # idle + iowait


def _busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of all the host's cores that were busy between two `_cpu_ticks` readings."""
    if before is None or after is None or after[0] == before[0]:
        return None
    return round(1 - (after[1] - before[1]) / (after[0] - before[0]), 3)


class _RunSampler:
    """Samples on a thread while the block runs: `_rss_bytes` (`peak`: the highest seen) and, on
    CUDA where NVML answers (pynvml installed), the GPU's utilisation (`gpu_utilization`: the
    mean share of time a kernel ran, None where it could not be read)."""

    _INTERVAL_S = 0.02
    _GPU_EVERY = 5
    """NVML averages over 1/6 to 1 s itself: every 0.1 s is plenty."""

    def __init__(self, device: torch.device):
        self.peak = _rss_bytes()
        self._device = device if device.type == "cuda" and _nvml_answers(device) else None
        self._utilization: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-sampler", daemon=True)

    @property
    def gpu_utilization(self) -> float | None:
        return round(sum(self._utilization) / len(self._utilization) / 100, 3) if self._utilization else None

    def _sample(self) -> None:
        tick = 0
        while not self._stop.wait(self._INTERVAL_S):
            now = _rss_bytes()
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now
            tick += 1
            if self._device is not None and tick % self._GPU_EVERY == 0:
                try:
                    self._utilization.append(torch.cuda.utilization(self._device))
                except Exception:  # noqa: BLE001 - NVML gone away: keep what was sampled
                    self._device = None

    def __enter__(self) -> "_RunSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _nvml_answers(device: torch.device) -> bool:
    """Whether torch can read the GPU's utilisation (it needs pynvml, which torch does not bring)."""
    try:
        torch.cuda.utilization(device)
    except Exception:  # noqa: BLE001 - no pynvml, no NVML library, an unsupported GPU
        return False
    return True


def _device_name(pipeline: LipsyncPipeline) -> str:
    device = pipeline.models.device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _commit() -> str:
    # A copy of the tree without .git (the lent GPU machine) says its commit through the environment.
    if os.environ.get("MUSETALK_COMMIT"):
        return os.environ["MUSETALK_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def render_table(report: dict) -> str:
    """A plain-text summary of the report for the terminal."""
    lines = [
        f"{report['date']}  {report['device']}  commit {report['commit']}  weights {report['weights']}  encoder {report['encoder']}",
        f"input {report['input']}  start-to-ready {report['start_to_ready_s']} s  "
        f"GPU held when ready {report['gpu_reserved_ready_gb']} GB",
    ]
    for name, run in report["runs"].items():
        phases = "  ".join(f"{k} {v:.1f}" for k, v in run["phases_s"].items() if k != "total")
        lines.append(
            f"{name:9s} {run['frames']} frames in {run['wall_s']} s = {run['output_fps']} fps "
            f"({run['realtime_factor']}x real time); GPU peak {run['gpu_memory_peak_gb']} GB "
            f"(held {run['gpu_reserved_peak_gb']} GB at most, {run['gpu_reserved_after_gb']} GB after), "
            f"host CPU busy {run['host_cpu_busy']}, "
            f"RSS {run['host_rss_before_gb']} GB before, {run['host_rss_run_peak_gb']} GB peak in the run, "
            f"{run['host_rss_peak_gb']} GB process peak"
        )
        lines.append(f"          busy s: {phases}")
        line = f"          frames generated {run['frames_generated']}, silent {run['frames_silent']}"
        if "speedup_vs_warm" in run:
            line += f"; {run['speedup_vs_warm']}x the warm run's fps"
        lines.append(line)
        lines.append(f"          {describe_verdict(name, run)}")
    if "ceilings" in report:
        for profile, encode in report["ceilings"]["encode"].items():
            counts = ", ".join(f"{n}: {m['fps']:g} fps {m['core_ms_per_frame']:g} core-ms/frame" for n, m in encode["by_encoders"].items())
            lines.append(
                f"encode ceiling ({profile}: {encode['encoder']} {encode['args']}, {encode['pix_fmt']} {encode['size']}): "
                f"{encode['fps']:g} fps with {encode['best_encoders']} at once; by encoders {counts}"
            )
        gpu = report["ceilings"]["gpu"]
        parts = "; ".join(
            f"{name} at {gpu[name]['batch']} {gpu[name]['ms_per_frame']:g} ms/frame ({gpu[name]['fps']:g} fps)"
            for name in ("generator", "vae_encoder", "face_phase")
        )
        lines.append(f"GPU ceiling ({gpu['device']}, face phase {gpu['face_detector']}): {parts}")
    return "\n".join(lines)
