"""The benchmark's verdict: which stage bounds a run, and how it fares against the targets."""

from __future__ import annotations

import pytest

from musetalk_service.benchmark.lipsync import describe_verdict, verdict

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
