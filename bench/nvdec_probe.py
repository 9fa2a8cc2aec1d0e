"""Can this machine decode on the GPU (NVDEC), and do its frames match ffmpeg's? (issue 18, item 2)

    python3 bench/nvdec_probe.py VIDEO [OUT_JSON [MAX_FRAMES]]

Nothing new to carry: PyAV's own FFmpeg (8.x in PyAV 18) has the CUDA hwaccel and h264_cuvid,
which load the driver's libcuda.so.1 and libnvcuvid.so.1 at run time. A container exposes the
latter only with NVIDIA_DRIVER_CAPABILITIES including `video`; this probe says whether it did.
It decodes VIDEO three ways, up to MAX_FRAMES frames (default 750): NVDEC with the frames left in
GPU memory (`is_hw_owned`, NV12 planes read by torch through DLPack), NVDEC downloaded to the host,
and the service's ffmpeg pipe (`VideoReader`, yuv420p, CPU), reporting fps and CPU ms per frame of
each, and whether the NVDEC frames are the pipe's, plane by plane (H.264 decoding is exact: any
difference is a bug, not rounding). Every step reports its own failure and the others go on.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

COMPARED_FRAMES = 50
"""Frames compared plane by plane (the first ones)."""


def _step(report: dict[str, Any], name: str, work: Callable[[], Any]) -> Any:
    try:
        report[name] = work()
    except Exception as exc:  # noqa: BLE001 - a probe: every failure is a finding
        report[name] = {"error": f"{type(exc).__name__}: {exc}", "where": traceback.format_exc(limit=3)[-600:]}
    print(name, json.dumps(report[name]), flush=True)
    return report[name]


def _driver_libraries() -> dict[str, bool]:
    found = {}
    for name in ("libcuda.so.1", "libnvcuvid.so.1", "libnvidia-encode.so.1"):
        try:
            ctypes.CDLL(name)
            found[name] = True
        except OSError:
            found[name] = False
    return found


def _versions() -> dict[str, Any]:
    import av
    import av.codec.hwaccel
    import torch

    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "pyav": av.__version__,
        "pyav_ffmpeg": getattr(av, "ffmpeg_version_info", None),
        "hwdevices": list(av.codec.hwaccel.hwdevices_available()),
        "h264_cuvid": "h264_cuvid" in av.codecs_available,
    }


def _nvdec(video: Path, max_frames: int, on_device: bool, keep: list) -> dict[str, Any]:
    """Decode with FFmpeg's CUDA hwaccel (no software fallback): fps, CPU ms a frame, the frames'
    format and (on the device) the planes as torch sees them; the first frames' planes kept."""
    import av
    import torch
    from av.codec.hwaccel import HWAccel

    hw = HWAccel("cuda", allow_software_fallback=False, is_hw_owned=on_device)
    frames = 0
    out: dict[str, Any] = {}
    cpu, started = time.process_time(), time.perf_counter()
    with av.open(str(video), hwaccel=hw) as container:
        stream = container.streams.video[0]
        out["is_hwaccel"] = stream.codec_context.is_hwaccel
        for frame in container.decode(stream):
            if frames == 0:
                out["frame_format"] = frame.format.name
            if on_device:
                planes = [torch.from_dlpack(plane) for plane in frame.planes]
                if frames == 0:
                    out["planes"] = [{"device": str(p.device), "shape": list(p.shape), "stride": list(p.stride())} for p in planes]
                if len(keep) < COMPARED_FRAMES:
                    keep.append([p.cpu().numpy() for p in planes])
            elif len(keep) < COMPARED_FRAMES:
                # Rows as stored (line_size may exceed the width); `_compare` crops them.
                keep.append([np.frombuffer(p, np.uint8)[: p.line_size * p.height].reshape(p.height, p.line_size).copy() for p in frame.planes])
            frames += 1
            if frames >= max_frames:
                break
        if on_device:
            torch.cuda.synchronize()
    wall = time.perf_counter() - started
    out.update(frames=frames, fps=round(frames / wall, 1), cpu_ms_per_frame=round(1000 * (time.process_time() - cpu) / frames, 2))
    return out


def _pipe(video: Path, max_frames: int, keep: list) -> dict[str, Any]:
    """The service's decoder: ffmpeg to a yuv420p pipe (CPU), as a warm request reads its video."""
    from musetalk_service.media.decode import VideoReader
    from musetalk_service.media.ffmpeg import find_ffmpeg
    from musetalk_service.media.probe import probe_video

    info = probe_video(video)
    w, h = info.width, info.height
    frames = 0
    times = os.times()
    started = time.perf_counter()
    with VideoReader(video, info, ffmpeg=find_ffmpeg(os.environ.get("MUSETALK_ENCODE__FFMPEG_PATH")), pix_fmt="yuv420p") as reader:
        while frames < max_frames and len(batch := reader.read(min(32, max_frames - frames))):
            for raw in batch:
                if len(keep) < COMPARED_FRAMES:
                    y = raw[: w * h].reshape(h, w)
                    u = raw[w * h : w * h + (w // 2) * (h // 2)].reshape(h // 2, w // 2)
                    v = raw[w * h + (w // 2) * (h // 2) :].reshape(h // 2, w // 2)
                    keep.append([y, u, v])
            frames += len(batch)
    wall = time.perf_counter() - started
    after = os.times()
    cpu = (after.user + after.system + after.children_user + after.children_system) - (
        times.user + times.system + times.children_user + times.children_system
    )
    return {"frames": frames, "fps": round(frames / wall, 1), "cpu_ms_per_frame": round(1000 * cpu / frames, 2), "size": f"{w}x{h}"}


def _compare(nvdec: list, pipe: list) -> dict[str, Any]:
    """NV12 (Y, interleaved UV; rows may be pitched wider) against yuv420p (Y, U, V)."""
    worst = {"y": 0, "u": 0, "v": 0}
    for got, want in zip(nvdec, pipe):
        y, u, v = want
        height, width = y.shape
        got_y = got[0].reshape(got[0].shape[0], -1)[:height, :width]
        got_uv = got[1].reshape(got[1].shape[0], -1)[: height // 2, :width]
        for name, a, b in (("y", got_y, y), ("u", got_uv[:, 0::2], u), ("v", got_uv[:, 1::2], v)):
            worst[name] = max(worst[name], int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()))
    return {"frames": min(len(nvdec), len(pipe)), "max_abs_diff": worst, "identical": not any(worst.values())}


def main() -> None:
    video = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    max_frames = int(sys.argv[3]) if len(sys.argv) > 3 else 750
    report: dict[str, Any] = {"video": str(video)}
    _step(report, "driver_libraries", _driver_libraries)
    _step(report, "versions", _versions)
    device_frames: list = []
    host_frames: list = []
    pipe_frames: list = []
    _step(report, "nvdec_on_device", lambda: _nvdec(video, max_frames, True, device_frames))
    _step(report, "nvdec_to_host", lambda: _nvdec(video, max_frames, False, host_frames))
    _step(report, "ffmpeg_pipe", lambda: _pipe(video, max_frames, pipe_frames))
    if device_frames and pipe_frames:
        _step(report, "on_device_vs_pipe", lambda: _compare(device_frames, pipe_frames))
    if host_frames and pipe_frames:
        _step(report, "to_host_vs_pipe", lambda: _compare(host_frames, pipe_frames))
    if out is not None:
        out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
