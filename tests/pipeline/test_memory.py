"""Memory does not grow with the video's length: frames stream from the decoder to the encoder.

Each run is its own `musetalk-service run` process so its peak RSS can be read on its own. At
1920x1080 a frame is 6.2 MB: holding the 150 more frames of the long run would add about 930 MB,
and holding them twice (decode list + output list, as peers did) far more. Both runs are longer
than the batches in flight between the stages (a few batches of 8), so both fill that window.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musetalk_service.media.synth import write_speech_like_audio, write_talking_head_video

SIZE = (1920, 1080)
FACE_BOX = ["760", "300", "1160", "780"]


def peak_rss_mb(models_dir: Path, video: Path, audio: Path, output: Path, work_dir: Path) -> float:
    command = [
        sys.executable, "-m", "musetalk_service", "run", "--models", str(models_dir), "--device", "cpu",
        "--video", str(video), "--audio", str(audio), "--output", str(output), "--face-box", *FACE_BOX,
    ]  # fmt: skip
    env = {**os.environ, "MUSETALK_WORK_DIR": str(work_dir), "MUSETALK_LIPSYNC__BATCH_SIZE": "8"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    output_text = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, output_text[-2000:]
    assert output.exists()
    return usage.ru_maxrss / 1024  # kB on Linux


def test_peak_rss_of_a_four_times_longer_input_grows_by_less_than_300_mb(tiny_models_dir, tmp_path, ffmpeg_exe):
    rss = {}
    for seconds in (2, 8):
        video = write_talking_head_video(tmp_path / f"v{seconds}s.mp4", seconds, 25, SIZE, motion=False, ffmpeg=ffmpeg_exe)
        audio = write_speech_like_audio(tmp_path / f"a{seconds}s.wav", seconds, ffmpeg=ffmpeg_exe)
        rss[seconds] = peak_rss_mb(tiny_models_dir, video, audio, tmp_path / f"out{seconds}s.mp4", tmp_path)

    assert rss[8] - rss[2] < 300, rss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_request_gives_its_gpu_memory_back_when_it_ends(tiny_settings, tmp_path, ffmpeg_exe):
    """The GPU is shared with a TTS model: what torch holds after a request is what it held before
    (the models), not the blocks cached on the request's streams."""
    from dataclasses import replace

    from musetalk_service.contract import LipsyncRequest
    from musetalk_service.pipeline.runner import LipsyncPipeline

    no_compile = tiny_settings.compile.model_copy(update={"enabled": False})  # quick: the blocks are the point
    settings = tiny_settings.model_copy(update={"device": "cuda:0", "compile": no_compile})
    pipeline = LipsyncPipeline.load(settings)
    video = write_talking_head_video(tmp_path / "v.mp4", 2, 25, (320, 240), ffmpeg=ffmpeg_exe)
    audio = write_speech_like_audio(tmp_path / "a.wav", 2, ffmpeg=ffmpeg_exe)
    request = LipsyncRequest.with_defaults(settings.lipsync, video_path=video, audio_path=audio, output_path=tmp_path / "o.mp4")
    held_before = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    pipeline.run(replace(request, face_box=(100, 40, 220, 200)))
    assert torch.cuda.max_memory_reserved() > held_before  # the request did allocate
    assert torch.cuda.memory_reserved() <= held_before


CAP_SCRIPT = """
import torch
from musetalk_service.nets.runtime import cap_memory
MB = 2**20
cap_memory(torch.device("cuda:0"), 0.5)
side = torch.cuda.Stream()
for stream in (torch.cuda.current_stream(), side, torch.cuda.current_stream(), side):
    with torch.cuda.stream(stream):  # each stream caches its freed block; the cap makes torch give them back
        block = torch.empty(300 * MB, dtype=torch.uint8, device="cuda")
        del block
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() <= 512 * MB, torch.cuda.memory_reserved()
try:
    torch.empty(600 * MB, dtype=torch.uint8, device="cuda")
except torch.OutOfMemoryError:
    print("capped")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_memory_cap_gives_cached_blocks_back_and_refuses_live_memory_beyond_it():
    """Own process: the cap holds for the whole process. Blocks cached on two streams would
    hold 600 MB under a 512 MB cap; torch hands them back instead, and only live memory past
    the cap fails."""
    done = subprocess.run([sys.executable, "-c", CAP_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "capped"
