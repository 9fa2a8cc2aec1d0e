"""The benchmark's verdict (which stage bounds a run, how it fares against the targets and its
ceilings) and the ceilings' own measurement (real ffmpeg encoders on frames held in memory)."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest

from musetalk_service.benchmark.ceilings import encode_ceiling, encoder_counts, gpu_ceiling_fps, held_frames
from musetalk_service.benchmark.lipsync import describe_verdict, run_ceiling, verdict
from musetalk_service.media.encode import VideoEncoder, encoder_for
from musetalk_service.settings import EncodeSettings

PHASES = ("read", "face_detect", "vae_encode", "audio", "unet", "blend", "encode", "mux")


def bench_run(wall_s: float, frames: int = 3000, gpu_held_gb: float | None = 3.9, **busy: float) -> dict:
    return {
        "frames": frames,
        "wall_s": wall_s,
        "output_fps": round(frames / wall_s, 1),
        "phases_s": {phase: busy.get(phase, 0.0) for phase in PHASES} | {"total": wall_s},
        "gpu_reserved_peak_gb": gpu_held_gb,
    }


def test_a_missed_target_names_the_stage_and_how_far_it_alone_is_over():
    # Session 5's warm run on the H100: the writer (compose, then the pipe into x264) bounds it.
    run = bench_run(22.07, read=8.7, unet=7.0, blend=2.0, encode=17.5, mux=1.9)
    v = verdict("warm", run)
    assert v["bound_by"] == "writer thread (parse + blend + encode)"
    assert v["bound_busy_s"] == 19.5 and v["bound_share_of_wall"] == 0.88
    assert v["target_fps"] == 250 and v["met"] is False
    assert v["bound_over_target_s"] == 7.5  # 19.5 s busy against 3000 / 250 = 12 s
    assert v["gpu_held_met"] is True
    assert "writer thread" in describe_verdict("warm", run) and "7.5 s more than the 12.0 s" in describe_verdict("warm", run)


def test_stages_that_each_fit_put_the_miss_on_overlap():
    run = bench_run(25.0, read=18.0, face_detect=17.0, vae_encode=9.0, unet=9.5, blend=8.0, encode=9.0, gpu_held_gb=9.4)
    v = verdict("cold", run)
    assert v["bound_by"] == "GPU thread (vae_encode + unet)"
    assert v["met"] is False and v["bound_over_target_s"] == -1.5  # 18.5 s busy, 20 s allowed
    assert v["gpu_held_met"] is False
    line = describe_verdict("cold", run)
    assert "missed by 5.0 s of wall time" in line and "over 8 GB" in line


def test_a_met_target_and_runs_without_one():
    fast = bench_run(11.5, read=6.0, unet=7.0, blend=1.0, encode=9.0)
    assert verdict("warm", fast)["met"] is True
    assert "target 250 fps met" in describe_verdict("warm", fast)
    # face_box has no target of its own; a CPU run has no GPU figure to judge.
    other = verdict("face_box", bench_run(30.0, gpu_held_gb=None, read=20.0))
    assert other["bound_by"] == "decoder thread (read)"
    assert not {"target_fps", "met", "gpu_held_met"} & set(other)


@pytest.mark.parametrize("mux", [0.2, 30.0])
def test_the_serial_mux_can_bound_a_run(mux):
    v = verdict("warm", bench_run(40.0, read=5.0, encode=6.0, mux=mux))
    assert (v["bound_by"] == "after the last frame (mux)") is (mux > 6.0)


# --- ceilings -----------------------------------------------------------------------------------

GPU = {  # ms per frame of each network alone, as `ceilings.gpu_ceiling` reports them
    "generator": {"ms_per_frame": 2.0},
    "vae_encoder": {"ms_per_frame": 1.0},
    "face_phase": {"ms_per_frame": 1.5},
}
ENCODE = {"standard": {"fps": 455.0}, "intermediate": {"fps": 756.0}}


def test_encoder_counts_double_up_to_half_the_cores():
    assert encoder_counts(16) == [1, 2, 4, 8]
    assert encoder_counts(12) == [1, 2, 4, 6]
    assert encoder_counts(2) == encoder_counts(1) == encoder_counts(None) == [1]


def test_a_runs_gpu_ceiling_adds_what_it_did_per_frame():
    # 3000 frames generated: 6 s of GPU; a new video adds 3000 x (1.0 + 1.5 ms) with detection.
    assert gpu_ceiling_fps(GPU, 3000, 3000, 0, False) == 500.0
    assert gpu_ceiling_fps(GPU, 3000, 3000, 3000, False) == pytest.approx(333.3)
    assert gpu_ceiling_fps(GPU, 3000, 3000, 3000, True) == pytest.approx(222.2)
    assert gpu_ceiling_fps(GPU, 3000, 2100, 0, False) == pytest.approx(714.3)  # 30 % silent: not generated
    assert gpu_ceiling_fps(GPU, 3000, 0, 0, False) is None  # nothing for the GPU to do


def test_the_ceiling_is_the_lower_one_and_the_verdict_says_which():
    ceilings = {"encode": ENCODE, "gpu": GPU}
    warm = bench_run(12.0, unet=6.0, encode=11.0) | {"frames_generated": 3000, "encode_profile": "standard"}
    warm.update(run_ceiling(warm, ceilings, video_frames=3000))
    assert warm["ceiling"] == {"fps": 455.0, "by": "encode", "encode_fps": 455.0, "gpu_fps": 500.0}
    assert warm["fps_over_ceiling"] == round(250.0 / 455.0, 3) and warm["fps_over_gpu_ceiling"] == 0.5
    line = describe_verdict("warm", warm)
    assert "0.55 of its ceiling 455 fps (encode 455 fps, GPU 500 fps: the encoders bound it)" in line
    # A new video with detection: the GPU's sum of generator, VAE encoder and face phase is lower.
    cold = bench_run(20.0, face_detect=5.0, vae_encode=3.0, unet=6.0) | {"frames_generated": 3000, "encode_profile": "intermediate"}
    cold.update(run_ceiling(cold, ceilings, video_frames=3000))
    assert cold["ceiling"]["by"] == "gpu" and cold["ceiling"]["encode_fps"] == 756.0
    assert verdict("cold", cold)["fps_over_ceiling"] == cold["fps_over_ceiling"] == round(150.0 / 222.2, 3)


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "bgr24"])
def test_the_encode_ceiling_runs_the_pipelines_encoder_on_held_frames(ffmpeg_exe, tmp_path, pix_fmt):
    """Real encoders on frames decoded from an output, in the pipe format the pipeline feeds."""
    choice = encoder_for("libx264", EncodeSettings())
    rng = np.random.default_rng(0)
    with VideoEncoder(tmp_path / "output.mp4", 96, 64, Fraction(25), choice, ffmpeg_exe) as made:
        made.write(rng.integers(0, 256, (12, 64, 96, 3), dtype=np.uint8))
    frames, width, height, fps = held_frames(tmp_path / "output.mp4", pix_fmt, ffmpeg_exe)
    assert len(frames) == 12 and (width, height, fps) == (96, 64, Fraction(25))
    before = set(os.listdir(tmp_path))
    ceiling = encode_ceiling(
        frames, width, height, fps, choice, ffmpeg_exe, pix_fmt, batch_size=5, work_dir=tmp_path, cpu_count=4, frames_per_encoder=30
    )  # fmt: skip
    assert set(os.listdir(tmp_path)) == before  # the encoders' files are gone
    assert ceiling["args"] == "-preset superfast -crf 22" and ceiling["pix_fmt"] == pix_fmt
    assert ceiling["frames_per_encoder"] == 36  # the 12 frames three times
    assert set(ceiling["by_encoders"]) == {"1", "2"}
    assert all(m["fps"] > 0 and m["core_ms_per_frame"] > 0 for m in ceiling["by_encoders"].values())
    assert ceiling["fps"] == max(m["fps"] for m in ceiling["by_encoders"].values())
    assert ceiling["fps"] == ceiling["by_encoders"][str(ceiling["best_encoders"])]["fps"]
