"""Encoder choice and the raw-frame encoder: exact rates and counts, odd sizes, failure hygiene."""

from __future__ import annotations

import os
import signal
from fractions import Fraction

import numpy as np
import pytest

from musetalk_service.errors import FFmpegError, OutputNotWritable
from musetalk_service.media.encode import EncoderChoice, VideoEncoder, choose_encoder, even_size
from musetalk_service.media.probe import count_video_frames, probe_video
from musetalk_service.settings import EncodeSettings

from .conftest import COLOURS, decode_all, encode_frames, pid_alive, solid_frames


def _frames(n: int, width: int = 64, height: int = 48) -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)


# --- choosing -----------------------------------------------------------------------------------


def test_auto_picks_libx264_without_nvenc_hardware(ffmpeg_exe):
    """This machine (like the H100/H200/A100 hosts) has no NVENC: the probe must notice."""
    choice = choose_encoder(EncodeSettings(encoder="auto", x264_preset="fast", x264_crf=23), ffmpeg_exe)
    assert choice == EncoderChoice("libx264", ("-preset", "fast", "-crf", "23"))


def test_forced_nvenc_fails_clearly(ffmpeg_exe):
    with pytest.raises(
        FFmpegError, match="encode.encoder='h264_nvenc' can't be used with .*h264_nvenc: .*exit code"
    ) as info:
        choose_encoder(EncodeSettings(encoder="h264_nvenc"), ffmpeg_exe)
    assert info.value.returncode not in (0, None)
    assert "nvenc" in info.value.stderr_tail.lower()


def test_explicit_libx264_honours_settings(ffmpeg_exe):
    choice = choose_encoder(EncodeSettings(encoder="libx264", x264_preset="ultrafast", x264_crf=30), ffmpeg_exe)
    assert choice.ffmpeg_args() == ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "30"]


def _x264_options(path) -> str:
    """The options x264 wrote into the stream (its SEI message): what it really encoded with."""
    data = path.read_bytes()
    start = data.index(b"options: ")
    return data[start : data.index(b"\x00", start)].decode("ascii", "replace")


def test_the_intermediate_profile_encodes_at_its_faster_preset(ffmpeg_exe, tmp_path):
    """encode.profile: intermediate swaps libx264's preset (ultrafast: no CABAC, no B-frames) and
    keeps the crf; the standard profile keeps x264_preset. Both files are whole and valid."""
    frames = _frames(30, 128, 96)
    outputs = {}
    for profile in ("standard", "intermediate"):
        settings = EncodeSettings(encoder="libx264", profile=profile)
        choice = choose_encoder(settings, ffmpeg_exe)
        preset = "ultrafast" if profile == "intermediate" else "superfast"
        assert choice.args == ("-preset", preset, "-crf", "22")
        outputs[profile] = encode_frames(tmp_path / f"{profile}.mp4", frames, Fraction(25), choice, ffmpeg_exe)
        info = probe_video(outputs[profile])
        assert count_video_frames(outputs[profile]) == info.frame_count == 30 and info.pix_fmt == "yuv420p"
    standard, intermediate = (_x264_options(outputs[p]) for p in ("standard", "intermediate"))
    assert "cabac=1" in standard and "cabac=0" in intermediate
    assert "bframes=0" in intermediate and "bframes=0" not in standard
    assert "crf=22.0" in standard and "crf=22.0" in intermediate
    # Another preset for the intermediate profile is honoured too.
    assert choose_encoder(EncodeSettings(encoder="libx264", profile="intermediate", intermediate_x264_preset="veryfast"), ffmpeg_exe).args[:2] == ("-preset", "veryfast")


def test_no_usable_encoder(ffmpeg_exe):
    with pytest.raises(
        FFmpegError, match="no H.264 encoder can be used with .*h264_nvenc: .*; libx264: .*no-such-preset"
    ) as info:
        choose_encoder(EncodeSettings(x264_preset="no-such-preset"), ffmpeg_exe)
    assert "no-such-preset" in info.value.stderr_tail


# --- encoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30)], ids=str)
def test_exact_rate_and_count(ffmpeg_exe, x264, tmp_path, fps):
    path = encode_frames(tmp_path / "out.mp4", _frames(37), fps, x264, ffmpeg_exe)
    info = probe_video(path)
    assert info.fps == fps
    assert count_video_frames(path) == info.frame_count == 37
    assert info.duration_s == pytest.approx(float(37 / fps), abs=1e-3)
    assert info.pix_fmt == "yuv420p"


def test_float_rate_is_made_exact(ffmpeg_exe, x264, tmp_path):
    path = encode_frames(tmp_path / "out.mp4", _frames(30), 30000 / 1001, x264, ffmpeg_exe)
    assert probe_video(path).fps == Fraction(30000, 1001)


def test_odd_size_is_cropped_to_even(ffmpeg_exe, x264, tmp_path):
    frames = solid_frames(COLOURS[:4], 255, 201)
    frames[:, :, 127:] = COLOURS[4]  # right half another colour, to see that nothing was scaled
    with VideoEncoder(tmp_path / "odd.mp4", 255, 201, Fraction(25), x264, ffmpeg_exe) as enc:
        assert enc.output_size == even_size(255, 201) == (254, 200)
        enc.write(frames)
    info = probe_video(tmp_path / "odd.mp4")
    assert (info.width, info.height) == (254, 200)
    decoded = decode_all(tmp_path / "odd.mp4", ffmpeg_exe)
    diff = np.abs(decoded.astype(int) - frames[:, :200, :254].astype(int))
    assert np.median(diff) <= 4  # colour edges ring a little in yuv420p; the layout is unchanged


def test_yuv420p_bytes_input(ffmpeg_exe, x264, tmp_path):
    """The GPU path sends planar yuv420p bytes (BT.709 limited): Y=126, U=V=128 is mid grey."""
    width, height = 65, 49  # odd: chroma planes round up
    chroma = 33 * 25
    frame = bytes([126]) * (width * height) + bytes([128]) * (2 * chroma)
    with VideoEncoder(
        tmp_path / "yuv.mp4", width, height, Fraction(25), x264, ffmpeg_exe, input_pix_fmt="yuv420p"
    ) as enc:
        enc.write(frame * 3)
        enc.write(memoryview(frame))
        with pytest.raises(ValueError, match="not a whole number"):
            enc.write(frame[:-1])
        assert enc.frames_written == 4
    decoded = decode_all(tmp_path / "yuv.mp4", ffmpeg_exe)
    assert decoded.shape == (4, 48, 64, 3)
    assert np.abs(decoded.astype(int) - 128).max() <= 4  # swscale's fast rounding, as in test_decode


def test_frames_written_and_single_frame_write(ffmpeg_exe, x264, tmp_path):
    frames = _frames(5)
    with VideoEncoder(tmp_path / "out.mp4", 64, 48, Fraction(25), x264, ffmpeg_exe) as enc:
        enc.write(frames[:3])
        enc.write(frames[3])
        enc.write(frames[4:4])
        assert enc.frames_written == 4
    assert count_video_frames(tmp_path / "out.mp4") == 4


def test_awkward_path(ffmpeg_exe, x264, tmp_path):
    """Leading dash, spaces, colon, quote: passed as one argv entry with no shell, never misparsed."""
    path = tmp_path / "-my clip: 'v1'.mp4"
    encode_frames(path, _frames(3), 25, x264, ffmpeg_exe)
    assert count_video_frames(path) == 3


# --- failures -----------------------------------------------------------------------------------


def test_killed_ffmpeg_mid_encode(ffmpeg_exe, x264, tmp_path):
    path = tmp_path / "killed.mp4"
    frames = _frames(8, 256, 256)
    with pytest.raises(FFmpegError) as info:
        with VideoEncoder(path, 256, 256, Fraction(25), x264, ffmpeg_exe) as enc:
            enc.write(frames)
            pid = enc.pid
            os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                enc.write(frames)
    assert info.value.returncode == -signal.SIGKILL
    assert "killed by SIGKILL" in info.value.message and "killed.mp4" in info.value.message
    assert not pid_alive(pid)
    assert not path.exists()


def test_exception_in_block_removes_partial_file(ffmpeg_exe, x264, tmp_path):
    path = tmp_path / "partial.mp4"
    with pytest.raises(ValueError, match=r"expected uint8 frames \[b, 48, 64, 3\]"):
        with VideoEncoder(path, 64, 48, Fraction(25), x264, ffmpeg_exe) as enc:
            enc.write(_frames(10))
            pid = enc.pid
            enc.write(_frames(2, 32, 32))
    assert not pid_alive(pid)
    assert not path.exists()


def test_encoder_that_fails_to_open(ffmpeg_exe, tmp_path):
    path = tmp_path / "bad.mp4"
    bad = EncoderChoice("libx264", ("-preset", "no-such-preset"))
    with pytest.raises(FFmpegError, match="no-such-preset"):
        with VideoEncoder(path, 64, 48, Fraction(25), bad, ffmpeg_exe) as enc:
            for _ in range(20):
                enc.write(_frames(10))
    assert not path.exists()


def test_output_dir_checked_before_start(ffmpeg_exe, x264, tmp_path):
    with pytest.raises(OutputNotWritable, match="does not exist"):
        VideoEncoder(tmp_path / "missing" / "out.mp4", 64, 48, Fraction(25), x264, ffmpeg_exe)
