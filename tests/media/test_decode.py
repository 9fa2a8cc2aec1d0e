"""Decoding: frame content and counts, constant rate out of variable rate, rotation, 10-bit, odd sizes."""

from __future__ import annotations

import signal
from fractions import Fraction

import cv2
import numpy as np
import pytest

from musetalk_service.errors import FFmpegError
from musetalk_service.media.decode import VideoReader
from musetalk_service.media.ffmpeg import file_arg, run_ffmpeg
from musetalk_service.media.probe import probe_video

from .conftest import COLOURS, decode_all, encode_frames, lavfi_video, pid_alive, solid_frames


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_solid_colours_round_trip(ffmpeg_exe, x264, tmp_path):
    frames = solid_frames(COLOURS * 2, 64, 48)
    path = encode_frames(tmp_path / "colours.mp4", frames, 25, x264, ffmpeg_exe)
    decoded = decode_all(path, ffmpeg_exe)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    # swscale's fast (default) rounding costs up to ~4 levels over the round trip; a BT.601/709
    # matrix mismatch would cost 10-20 on these colours.
    for got, want in zip(decoded, frames, strict=True):
        assert np.abs(got.reshape(-1, 3).mean(0) - want[0, 0]).max() < 5, (got[0, 0], want[0, 0])


def test_read_batches_and_end(ffmpeg_exe, talking_head_video):
    info = probe_video(talking_head_video)
    with VideoReader(talking_head_video, info, None, ffmpeg_exe) as reader:
        first = reader.read(32)
        rest = reader.read(32)
        done = reader.read(32)
        again = reader.read(5)
    assert first.shape == (32, 256, 256, 3)
    assert rest.shape == (18, 256, 256, 3)
    assert done.shape == (0, 256, 256, 3) and again.shape[0] == 0
    assert reader.frames_read == 50 == info.frame_count


def test_frames_are_the_video_frames(ffmpeg_exe, talking_head_video):
    """Same pixels as an independent decoder (OpenCV's own FFmpeg), frame by frame."""
    ours = decode_all(talking_head_video, ffmpeg_exe)
    capture = cv2.VideoCapture(str(talking_head_video))
    theirs = []
    while (frame := capture.read()[1]) is not None:
        theirs.append(frame)
    assert len(theirs) == len(ours) == 50
    assert max(_mean_abs_diff(a, b) for a, b in zip(ours, theirs, strict=True)) < 2.0
    assert _mean_abs_diff(ours[0], ours[25]) > 2.0  # the head moves


def test_variable_frame_rate_becomes_constant(ffmpeg_exe, tmp_path):
    """Frames 0-9 last two ticks each, 10-14 one tick: at 25 fps the first ten come out twice."""
    vfr = lavfi_video(
        ffmpeg_exe,
        tmp_path / "vfr.mp4",
        "testsrc2=size=160x120:rate=25",
        after=["-t", "1", "-vf", "setpts='if(lt(N,10),N*2,N+10)/25/TB'", "-fps_mode", "passthrough"],
    )
    info = probe_video(vfr)
    assert info.frame_count == 15 and info.fps != 25  # the average rate of a VFR stream
    frames = decode_all(vfr, ffmpeg_exe, fps=Fraction(25))
    assert frames.shape[0] == 25
    for k in range(10):
        assert np.array_equal(frames[2 * k], frames[2 * k + 1])
        assert not np.array_equal(frames[2 * k + 1], frames[2 * k + 2])
    for k in range(20, 24):
        assert not np.array_equal(frames[k], frames[k + 1])


def test_rate_conversion_keeps_duration(ffmpeg_exe, make_video):
    path = make_video(2.0, 30, (96, 96))
    assert decode_all(path, ffmpeg_exe, fps=Fraction(25)).shape[0] == 50
    assert decode_all(path, ffmpeg_exe, fps=Fraction(30000, 1001)).shape[0] == 60


@pytest.mark.parametrize("rotation, turns", [(90, 1), (180, 2), (270, 3)])
def test_rotated_video_decodes_upright(ffmpeg_exe, make_video, tmp_path, rotation, turns):
    """A counter-clockwise display rotation of r degrees shows the coded frame turned r degrees
    counter-clockwise (np.rot90 k times)."""
    src = make_video(1.0, 25, (160, 96), motion=False)
    rotated = tmp_path / "rotated.mp4"
    run_ffmpeg(ffmpeg_exe, ["-display_rotation", str(rotation), "-i", file_arg(src), "-c", "copy", file_arg(rotated)])
    info = probe_video(rotated)
    frames = decode_all(rotated, ffmpeg_exe)
    assert frames.shape == (25, info.height, info.width, 3)
    upright = np.rot90(decode_all(src, ffmpeg_exe)[0], turns)
    assert _mean_abs_diff(frames[0], upright) < 1.0


def test_ten_bit_input(ffmpeg_exe, tmp_path):
    source = "testsrc2=size=320x240:rate=25:duration=1"
    eight = decode_all(lavfi_video(ffmpeg_exe, tmp_path / "8.mp4", source), ffmpeg_exe)
    ten = decode_all(lavfi_video(ffmpeg_exe, tmp_path / "10.mp4", source, pix_fmt="yuv420p10le"), ffmpeg_exe)
    assert ten.shape == eight.shape == (25, 240, 320, 3)
    assert _mean_abs_diff(ten[0], eight[0]) < 3.0


def test_odd_size_input(ffmpeg_exe, tmp_path):
    path = lavfi_video(ffmpeg_exe, tmp_path / "odd.mp4", "testsrc=size=251x181:rate=25:duration=0.4", pix_fmt="yuv444p")
    info = probe_video(path)
    assert (info.width, info.height) == (251, 181)
    frames = decode_all(path, ffmpeg_exe)
    assert frames.shape == (10, 181, 251, 3)


def test_still_image_reads_as_one_frame(ffmpeg_exe, tmp_path):
    image = np.zeros((51, 77, 3), np.uint8)
    image[:, :40] = COLOURS[0]
    image[:, 40:] = COLOURS[1]
    path = tmp_path / "face.png"
    cv2.imwrite(str(path), image)
    frames = decode_all(path, ffmpeg_exe)
    assert frames.shape == (1, 51, 77, 3)
    assert _mean_abs_diff(frames[0], image) < 1.0


def test_leaving_early_kills_ffmpeg(ffmpeg_exe, talking_head_video):
    with VideoReader(talking_head_video, probe_video(talking_head_video), None, ffmpeg_exe) as reader:
        reader.read(1)
        pid = reader._pipe.pid
    assert not pid_alive(pid)
    assert reader._pipe.returncode == -signal.SIGKILL


def test_decode_failure_raises_at_read(ffmpeg_exe, talking_head_video, tmp_path):
    """The file vanishes between probe and decode: ffmpeg's failure surfaces from read()."""
    path = tmp_path / "gone.mp4"
    path.write_bytes(talking_head_video.read_bytes())
    info = probe_video(path)
    path.unlink()
    with pytest.raises(FFmpegError, match="decoding .*gone.mp4.*No such file"):
        with VideoReader(path, info, None, ffmpeg_exe) as reader:
            reader.read(4)


@pytest.mark.parametrize("codec", ["libx264", "ffv1"])
def test_yuv420p_frames_are_the_decoders_planes(ffmpeg_exe, tmp_path, codec):
    """pix_fmt yuv420p hands over the planes as decoded, byte for byte (PyAV's decoder as witness)."""
    import av

    width, height = 64, 48
    path = tmp_path / "planes.mkv"
    source = f"testsrc2=size={width}x{height}:rate=25:duration=0.4"
    run_ffmpeg(ffmpeg_exe, ["-f", "lavfi", "-i", source, "-c:v", codec, "-pix_fmt", "yuv420p", file_arg(path)])
    with VideoReader(path, probe_video(path), None, ffmpeg_exe, pix_fmt="yuv420p") as reader:
        assert reader.frame_shape == (width * height * 3 // 2,)
        frames = reader.read(20)
    with av.open(str(path)) as container:
        decoded = [
            # Each plane's rows are padded to its line size: cut them to its width.
            np.concatenate([np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width].ravel() for p in frame.planes])
            for frame in container.decode(video=0)
        ]
    assert frames.shape == (10, *reader.frame_shape)
    assert np.array_equal(frames, np.stack(decoded))


def test_an_untagged_video_decodes_to_bgr_as_bt709(ffmpeg_exe, tmp_path):
    """A stream with no colour tags is read as BT.709 (as HD players show it), not as swscale's
    BT.601 default: then its BGR frames and its passed-through planes mean the same colours."""
    path = lavfi_video(ffmpeg_exe, tmp_path / "untagged.mp4", "color=c=0xC04020:size=64x48:rate=25:duration=0.2")
    info = probe_video(path)
    assert info.colorspace == "unspecified"
    blue, _, red = decode_all(path, ffmpeg_exe)[0].reshape(-1, 3).mean(0)
    with VideoReader(path, info, None, ffmpeg_exe, pix_fmt="yuv420p") as reader:
        y, u, v = (plane.mean() for plane in np.split(reader.read(1)[0], [64 * 48, 64 * 48 + 32 * 24]))
    kr, kb = 0.2126, 0.0722  # BT.709; BT.601's 0.299 and 0.114 put red about 10 levels off here
    luma = (y - 16) * 255 / 219
    assert abs(red - (luma + (v - 128) * 255 / 224 * 2 * (1 - kr))) < 2
    assert abs(blue - (luma + (u - 128) * 255 / 224 * 2 * (1 - kb))) < 2
