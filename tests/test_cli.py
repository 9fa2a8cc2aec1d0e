"""The `musetalk-service` command: weights, serve refusing to start, run and demo end to end."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from musetalk_service.cli import main
from musetalk_service.media.probe import probe_audio, probe_video
from musetalk_service.contract import PHASES
from tests.api.live import FACE_BOX

CONSOLE_SCRIPT = Path(sys.executable).with_name("musetalk-service")


def test_random_tiny_weights_pass_the_check(tmp_path, capsys):
    models = tmp_path / "models"

    assert main(["weights", "random", "--size", "tiny", "--dir", str(models)]) == 0
    assert main(["weights", "check", "--dir", str(models)]) == 0

    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out
    assert f"weights in {models}: random, ok" in out


def test_check_of_an_empty_folder_fails_naming_the_missing_files(tmp_path, capsys):
    assert main(["weights", "check", "--dir", str(tmp_path)]) == 1

    out = capsys.readouterr().out
    assert "missing" in out and "musetalkV15/unet.pth" in out and "face-parse-bisent/79999_iter.pth" in out
    assert f"musetalk-service weights download --dir {tmp_path}" in out


def test_check_in_haar_mode_does_not_ask_for_s3fd_and_fan(tiny_models_dir, tmp_path, capsys):
    models = Path(shutil.copytree(tiny_models_dir, tmp_path / "models"))
    for relpath in ("face-detection/s3fd.pth", "face-detection/2DFAN4.pth"):
        (models / relpath).unlink()
    haar_config = tmp_path / "haar.yaml"
    haar_config.write_text("face:\n  detector: haar\n")

    assert main(["weights", "check", "--dir", str(models), "--config", str(haar_config)]) == 0
    out = capsys.readouterr().out
    assert f"weights in {models}: random, ok" in out
    assert "missing" not in out
    assert "not checked, only face.detector: s3fd loads them: face-detection/s3fd.pth, face-detection/2DFAN4.pth" in out

    # The default settings (s3fd) still need them.
    assert main(["weights", "check", "--dir", str(models)]) == 1
    out = capsys.readouterr().out
    assert "missing   face-detection/s3fd.pth" in out and "missing   face-detection/2DFAN4.pth" in out


def test_serve_refuses_to_start_without_weights(tmp_path):
    # The console script in a process of its own, as an operator or a container runs it.
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "serve", "--models", str(tmp_path), "--device", "cpu", "--port", "1"],
        capture_output=True, text=True, timeout=120,
    )

    assert done.returncode == 2, done.stderr
    assert "musetalkV15/unet.pth" in done.stderr
    assert f"musetalk-service weights download --dir {tmp_path}" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_writes_the_mp4_and_prints_the_timings(tiny_models_dir, talking_head_video, make_audio, tmp_path, capsys):
    output = tmp_path / "out.mp4"

    code = main([
        "run", "--video", str(talking_head_video), "--audio", str(make_audio(1.0)), "--output", str(output),
        "--face-box", *map(str, FACE_BOX), "--batch-size", "8", "--models", str(tiny_models_dir), "--device", "cpu",
    ])

    out = capsys.readouterr().out
    assert code == 0, out
    assert probe_video(output).frame_count == 25
    assert f"wrote {output}" in out
    table = out[out.index("phase"):]
    for phase in (*PHASES, "total"):
        assert f"\n{phase} " in table
    assert "RANDOM WEIGHTS" in out


def test_run_with_a_bad_input_says_what_is_wrong(tiny_models_dir, speech_wav, tmp_path, capsys):
    code = main(["run", "--video", str(tmp_path / "nope.mp4"), "--audio", str(speech_wav), "--models", str(tiny_models_dir)])

    assert code == 1
    assert "[file_not_found] video_path" in capsys.readouterr().err


def test_run_with_a_bad_option_value_says_which(tiny_models_dir, talking_head_video, speech_wav, capsys):
    code = main([
        "run", "--video", str(talking_head_video), "--audio", str(speech_wav), "--batch-size", "0",
        "--models", str(tiny_models_dir),
    ])

    assert code == 1
    assert "batch_size: Input should be greater than or equal to 1" in capsys.readouterr().err


@pytest.mark.parametrize(("fps", "reason"), [
    ("0.0001", "must be between 1 and 120"),
    ("1e308", "must be between 1 and 120"),
    ("nan", "must be between 1 and 120"),
    ("25/0", "denominator must not be 0"),
    ("fast", "must be a number or a rate string"),
])
def test_run_with_a_bad_fps_stops_at_the_command_line(fps, reason, tmp_path):
    # The console script, as a user runs it: argparse's one-line error and exit 2, before any model loads.
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "run", "--video", str(tmp_path / "v.mp4"), "--audio", str(tmp_path / "a.wav"), "--fps", fps],
        capture_output=True, text=True, timeout=120,
    )

    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("musetalk-service run: error: argument --fps:") and reason in last, done.stderr
    assert "Traceback" not in done.stderr


def test_run_with_a_face_box_outside_the_frame_stops_before_loading(tiny_models_dir, talking_head_video, speech_wav, capsys):
    code = main([
        "run", "--video", str(talking_head_video), "--audio", str(speech_wav), "--face-box", "0", "0", "5000", "5000",
        "--models", str(tiny_models_dir),
    ])

    assert code == 1
    assert "[invalid_option] face_box: [0, 0, 5000, 5000] reaches outside" in capsys.readouterr().err


def test_demo_without_weights_uses_tiny_random_ones_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    empty = tmp_path / "models"
    empty.mkdir()
    output = tmp_path / "demo.mp4"

    code = main(["demo", "--models", str(empty), "--output", str(output), "--seconds", "0.5", "--device", "cpu"])

    out = capsys.readouterr().out
    assert code == 0, out
    assert "RANDOM WEIGHTS" in out and "NOT a lip-sync" in out
    assert f"wrote {output}" in out and "total" in out
    assert probe_video(output).frame_count == 12  # floor(0.5 s x 25 fps)
    assert probe_audio(output).duration_s == pytest.approx(0.5, abs=0.05)


def test_serve_with_a_missing_input_root_refuses_to_start(tiny_models_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MUSETALK_INPUT_ROOTS", json.dumps([str(tmp_path / "no-such-folder")]))

    code = main(["serve", "--models", str(tiny_models_dir), "--device", "cpu", "--port", "1"])

    assert code == 2
    err = capsys.readouterr().err
    assert "bad settings" in err and "no-such-folder" in err and "input_roots" in err


def test_serve_with_malformed_weights_stops_with_the_reason(tiny_models_dir, tmp_path):
    # Every file is there (so the socket opens and /health answers) but the UNet is damaged: the
    # background load fails and the server stops with exit code 2, naming the file.
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    unet = next(models.rglob("unet.pth"))
    unet.write_bytes(unet.read_bytes()[:100])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "serve", "--models", str(models), "--device", "cpu", "--port", str(port)],
        capture_output=True, text=True, timeout=120,
    )

    assert done.returncode == 2, done.stderr
    assert "cannot start" in done.stderr and "unet.pth" in done.stderr


def test_bench_runs_the_real_pipeline_and_writes_its_report(tiny_models_dir, tmp_path):
    """A small bench on the tiny weights: cold, warm (avatar reused), face_box, silence30 and
    warm_intermediate runs, its ceilings measured and each run read against them, JSON written."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "musetalk_service", "bench", "--models", str(tiny_models_dir), "--device", "cpu",
         "--seconds", "0.4", "--size", "160", "128", "--out", str(out),
         "--runs", "cold,warm,face_box,silence30,warm_intermediate"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"cold", "warm", "face_box", "silence30", "warm_intermediate"}
    assert all(report["runs"][name]["frames"] == 10 for name in ("cold", "warm", "face_box"))
    silent = report["runs"]["silence30"]  # its own track, 30 % silence: every frame generated or passed through
    assert silent["frames"] > 0 and silent["frames_generated"] + silent["frames_silent"] <= silent["frames"]
    assert report["runs"]["warm"]["avatar_id"] == report["runs"]["cold"]["avatar_id"]
    assert report["runs"]["warm"]["phases_s"]["vae_encode"] == 0
    assert report["weights"] == "random" and "warm" in done.stdout
    for run in report["runs"].values():  # resident memory: before <= the request's peak <= the process's
        assert 0 < run["host_rss_before_gb"] <= run["host_rss_run_peak_gb"] <= run["host_rss_peak_gb"], run
        assert 0 < run["host_cpu_busy"] <= 1, run  # the request kept at least part of a core busy
        assert run["gpu_memory_peak_gb"] is None and run["gpu_reserved_peak_gb"] is None, run  # CPU run
        assert run["verdict"]["bound_by"] and "gpu_held_met" not in run["verdict"], run
    assert report["runs"]["cold"]["verdict"]["target_fps"] == 150 and "face_box" in done.stdout
    assert done.stdout.count("bound by the ") == len(report["runs"])

    # The ceilings: the encoders fed from memory (per encode profile run), the networks alone.
    ceilings = report["ceilings"]
    assert set(ceilings["encode"]) == {"standard", "intermediate"}
    standard, intermediate = ceilings["encode"]["standard"], ceilings["encode"]["intermediate"]
    assert standard["args"] == "-preset superfast -crf 22" and intermediate["args"] == "-preset ultrafast -crf 22"
    assert standard["pix_fmt"] == "bgr24" and standard["size"] == "160x128"  # the numpy compose path's pipe
    for encode in (standard, intermediate):
        assert encode["fps"] > 0 and encode["fps"] == max(m["fps"] for m in encode["by_encoders"].values())
    gpu = ceilings["gpu"]
    assert gpu["device"] == "cpu" and gpu["generator"]["batch"] == 16 and gpu["vae_encoder"]["batch"] == 32
    assert all(gpu[part]["ms_per_frame"] > 0 and gpu[part]["fps"] > 0 for part in ("generator", "vae_encoder", "face_phase"))
    for name, run in report["runs"].items():
        ceiling = run["ceiling"]
        assert ceiling["encode_fps"] == ceilings["encode"][run["encode_profile"]]["fps"], name
        lowest = ceiling["encode_fps"] if ceiling["gpu_fps"] is None else min(ceiling["encode_fps"], ceiling["gpu_fps"])
        assert ceiling["fps"] == lowest > 0, name
        assert run["fps_over_ceiling"] == round(run["output_fps"] / ceiling["fps"], 3), name
        assert run["verdict"]["fps_over_ceiling"] == run["fps_over_ceiling"], name
        cpu = run["cpu"]
        assert cpu["core_ms_per_frame"] == pytest.approx(cpu["process_core_ms_per_frame"] + cpu["ffmpeg_core_ms_per_frame"], abs=0.02)
        assert cpu["process_core_ms_per_frame"] > 0 and cpu["ffmpeg_core_ms_per_frame"] > 0 and cpu["host_core_ms_per_frame"] > 0, name
        assert cpu["stage_busy_ms_per_frame"]["GPU thread (vae_encode + unet)"] > 0, name
        assert 0 < run["gpu_thread_busy_share"] <= 1 and run["gpu_utilization_nvml"] is None, name  # a CPU run
    warm, cold = report["runs"]["warm"], report["runs"]["cold"]
    assert warm["encode_profile"] == "standard" and report["runs"]["warm_intermediate"]["encoder_args"] == intermediate["args"]
    # A new video's GPU work includes the VAE encoder and the face phase: a lower GPU ceiling.
    assert cold["ceiling"]["gpu_fps"] < warm["ceiling"]["gpu_fps"]
    assert "of its ceiling" in done.stdout and "encode ceiling (intermediate" in done.stdout
