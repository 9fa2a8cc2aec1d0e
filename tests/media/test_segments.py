"""Segmented parallel encoding: exact frames and timestamps across joins, A/V sync after the mux,
the one-worker fallback, and cleanup after every kind of failure."""

from __future__ import annotations

import os
import signal
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from musetalk_service.errors import FFmpegError, OutputNotWritable
from musetalk_service.media.encode import EncoderChoice, VideoEncoder
from musetalk_service.media.ffmpeg import file_arg, run_ffmpeg
from musetalk_service.media.mux import mux_audio
from musetalk_service.media.probe import count_video_frames, probe_audio, probe_video
from musetalk_service.media.segments import (
    MIN_SEGMENT_FRAMES,
    SegmentedEncoder,
    _check_timing,
    encode_workers_for,
)

from tests.fixtures.processes import ffmpeg_children

from .conftest import decode_all, pid_alive

W, H = 128, 96
NTSC = Fraction(30000, 1001)

# Each frame carries its index in two grey blocks (base 12, levels 16 apart: x264 at crf 18 keeps
# a flat block within a few levels), over a checkerboard that moves, so x264 uses B-frames.
_BASE, _STEP, _LOW = 12, 16, 24


def coded_frames(start: int, count: int, width: int = W, height: int = H) -> np.ndarray:
    """Frames `start`..`start + count - 1`, `[count, H, W, 3]` BGR."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((count, height, width, 3), np.uint8)
    for n in range(count):
        i = start + n
        frames[n] = ((((x + 3 * i) // 16 + y // 16) % 2) * 60 + 90).astype(np.uint8)[..., None]
        code = i % _BASE**2
        frames[n, :32, :32] = _LOW + _STEP * (code % _BASE)
        frames[n, :32, 32:64] = _LOW + _STEP * (code // _BASE)
    return frames


def read_codes(frames: np.ndarray) -> list[int]:
    """The index each decoded frame carries (see `coded_frames`)."""
    low = np.median(frames[:, 8:24, 8:24], axis=(1, 2, 3))
    high = np.median(frames[:, 8:24, 40:56], axis=(1, 2, 3))
    return [round((a - _LOW) / _STEP) + _BASE * round((b - _LOW) / _STEP) for a, b in zip(low, high)]


def packets(path: Path) -> tuple[list[tuple[int, int, bool]], Fraction]:
    """(pts, dts, keyframe) of every video packet in decode order, and the stream's time base."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        found = [(p.pts, p.dts, p.is_keyframe) for p in container.demux(stream) if p.size]
        return found, stream.time_base


def assert_constant_rate(path: Path, count: int, fps: Fraction) -> list[tuple[int, int, bool]]:
    """`count` frames, frame k at pts exactly k/fps, dts one frame apart; returns the packets."""
    found, time_base = packets(path)
    tick = 1 / (fps * time_base)
    assert tick.denominator == 1  # the MP4 timescale holds a frame in whole ticks
    assert count_video_frames(path) == len(found) == count
    assert sorted(p for p, _, _ in found) == [k * tick for k in range(count)]
    dts = [d for _, d, _ in found]
    assert dts == [dts[0] + k * tick for k in range(count)]
    info = probe_video(path)
    assert (info.fps, info.frame_count) == (fps, count)
    return found


def expected_segment_starts(count: int, segment_frames: int) -> list[int]:
    """Segments of `segment_frames`; a remainder under MIN_SEGMENT_FRAMES joins the last one."""
    starts = list(range(0, count, segment_frames))
    if len(starts) > 1 and count - starts[-1] < MIN_SEGMENT_FRAMES:
        starts.pop()
    return starts


@pytest.fixture
def work(tmp_path) -> Path:
    """The encoder's tmp_dir, apart from the output's folder so leftovers are easy to see."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def assert_clean(work: Path, out: Path, *, output: bool) -> None:
    assert list(work.iterdir()) == []
    assert out.exists() == output
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".part")] == []
    assert ffmpeg_children() == []


# --- output -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count, segment_frames, workers",
    [
        (120, 24, 2),  # a multiple of the segment size
        (77, 16, 3),  # a 13-frame remainder, under MIN_SEGMENT_FRAMES: appended to the last segment
        (61, 20, 2),  # a 1-frame remainder, likewise
        (77, 20, 2),  # a 17-frame remainder: a segment of its own
        (10, 25, 2),  # smaller than one segment
    ],
)
def test_joined_output_is_exact(ffmpeg_exe, x264, tmp_path, work, count, segment_frames, workers):
    out = tmp_path / "out.mp4"
    frames = coded_frames(0, count)
    with SegmentedEncoder(
        out, W, H, NTSC, x264, ffmpeg_exe, workers=workers, segment_frames=segment_frames, tmp_dir=work
    ) as enc:
        assert enc.output_size == (W, H)
        for start in range(0, count, 7):  # batches that straddle segment boundaries
            enc.write(frames[start : start + 7])
        enc.write(frames[:0])
        assert enc.frames_written == count
        assert len(enc.pids) <= workers
    found = assert_constant_rate(out, count, NTSC)
    if count > 3:
        assert any(p != d for p, d, _ in found)  # B-frames are in use, reordered across joins
    keyframes = {k for k, (_, _, key) in enumerate(sorted(found)) if key}
    assert keyframes == set(expected_segment_starts(count, segment_frames))  # an IDR opens each segment
    decoded = decode_all(out, ffmpeg_exe)
    assert read_codes(decoded) == list(range(count))
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 2
    assert_clean(work, out, output=True)


def test_no_drift_over_many_segments(ffmpeg_exe, x264, tmp_path, work):
    """At 60000/1001 fps a frame is 16683.33 us; rounding each segment's duration to microseconds
    would put frames one tick off after ~25 segments. 27 segments here."""
    fps = Fraction(60000, 1001)
    count = 27 * MIN_SEGMENT_FRAMES + 5
    out = tmp_path / "out.mp4"
    with SegmentedEncoder(
        out, 64, 48, fps, x264, ffmpeg_exe, workers=3, segment_frames=MIN_SEGMENT_FRAMES, tmp_dir=work
    ) as enc:
        enc.write(coded_frames(0, count, 64, 48))
    assert_constant_rate(out, count, fps)


def test_single_frame_writes_and_odd_size(ffmpeg_exe, x264, tmp_path, work):
    out = tmp_path / "odd.mp4"
    frames = coded_frames(0, 40, 129, 97)
    with SegmentedEncoder(out, 129, 97, 25, x264, ffmpeg_exe, workers=2, segment_frames=16, tmp_dir=work) as enc:
        assert enc.output_size == (128, 96)
        for frame in frames:
            enc.write(frame)
    assert_constant_rate(out, 40, Fraction(25))
    assert read_codes(decode_all(out, ffmpeg_exe)) == list(range(40))


def test_yuv420p_input(ffmpeg_exe, x264, tmp_path, work):
    """Planar yuv420p bytes (BT.709 limited range): grey level g is Y = 16 + g * 219 / 255."""
    count = 50
    grey = coded_frames(0, count)[..., 0].astype(float)
    luma = np.round(16 + grey * 219 / 255).astype(np.uint8)
    chroma = np.full((count, 2 * (H // 2) * (W // 2)), 128, np.uint8)
    data = np.concatenate([luma.reshape(count, -1), chroma], axis=1)  # one row of bytes per frame
    out = tmp_path / "yuv.mp4"
    with SegmentedEncoder(
        out, W, H, 25, x264, ffmpeg_exe, workers=2, segment_frames=16, input_pix_fmt="yuv420p", tmp_dir=work
    ) as enc:
        enc.write(data[:30].tobytes())
        enc.write(memoryview(data[30:].tobytes()))
        with pytest.raises(ValueError, match="not a whole number"):
            enc.write(data[0, :-1].tobytes())
        assert enc.frames_written == count
    assert_constant_rate(out, count, Fraction(25))
    decoded = decode_all(out, ffmpeg_exe)
    assert read_codes(decoded) == list(range(count))
    assert np.abs(decoded[..., 1].astype(int) - grey).mean() < 3
    assert_clean(work, out, output=True)


def test_muxed_audio_stays_in_sync(ffmpeg_exe, x264, make_audio, tmp_path, work):
    """What the pipeline does: floor(audio_s * fps) frames, then mux_audio (video copied)."""
    fps = Fraction(25)
    audio = make_audio(2.3, ".wav")
    count = int(probe_audio(audio).duration_s * fps)
    video, out = tmp_path / "video.mp4", tmp_path / "out.mp4"
    with SegmentedEncoder(video, W, H, fps, x264, ffmpeg_exe, workers=2, segment_frames=16, tmp_dir=work) as enc:
        enc.write(coded_frames(0, count))
    mux_audio(video, audio, out, ffmpeg_exe)
    assert_constant_rate(out, count, fps)
    with av.open(str(out)) as container:
        v, a = container.streams.video[0], container.streams.audio[0]
        assert v.start_time * v.time_base == 0
        assert abs(a.start_time * a.time_base) < 1 / fps
        video_s = float(v.duration * v.time_base)
    assert video_s == pytest.approx(count / fps)
    assert abs(video_s - probe_audio(out).duration_s) <= 1 / fps


def test_one_worker_is_one_encoder(ffmpeg_exe, x264, tmp_path, work):
    out = tmp_path / "out.mp4"
    with SegmentedEncoder(out, W, H, NTSC, x264, ffmpeg_exe, workers=1, segment_frames=16, tmp_dir=work) as enc:
        enc.write(coded_frames(0, 30))
        (pid,) = enc.pids
        enc.write(coded_frames(30, 30))
        assert enc.pids == [pid]
        assert list(work.iterdir()) == []  # writes `out` itself: no segments
    found = assert_constant_rate(out, 60, NTSC)
    assert sum(key for _, _, key in found) == 1


def test_awkward_paths(ffmpeg_exe, x264, tmp_path):
    """Quotes, '?', '#', '%', a colon, a leading dash: the concat list must still find every file."""
    work = tmp_path / "-work: it's ?x=1#y %20"
    work.mkdir()
    out = tmp_path / "-out 'v1'#.mp4"
    out.write_text("an older result, replaced")
    with SegmentedEncoder(out, W, H, 25, x264, ffmpeg_exe, workers=2, segment_frames=16, tmp_dir=work) as enc:
        enc.write(coded_frames(0, 40))
    assert_constant_rate(out, 40, Fraction(25))
    assert_clean(work, out, output=True)


def test_no_frames_gives_an_empty_mp4_like_video_encoder(ffmpeg_exe, x264, tmp_path, work):
    with SegmentedEncoder(tmp_path / "seg.mp4", W, H, 25, x264, ffmpeg_exe, workers=2, segment_frames=16, tmp_dir=work):
        pass
    with VideoEncoder(tmp_path / "one.mp4", W, H, 25, x264, ffmpeg_exe):
        pass
    assert (tmp_path / "seg.mp4").read_bytes() == (tmp_path / "one.mp4").read_bytes()
    assert list(work.iterdir()) == []


# --- failures -----------------------------------------------------------------------------------


def test_killed_segment_ffmpeg(ffmpeg_exe, x264, tmp_path, work):
    out = tmp_path / "out.mp4"
    with pytest.raises(FFmpegError) as info:
        with SegmentedEncoder(out, W, H, 25, x264, ffmpeg_exe, workers=2, segment_frames=16, tmp_dir=work) as enc:
            enc.write(coded_frames(0, 40))  # segment 0 complete, segment 1 open (its end not yet known)
            pids = enc.pids
            os.kill(pids[-1], signal.SIGKILL)
            for start in range(40, 400, 8):
                enc.write(coded_frames(start, 8))
    assert info.value.returncode == -signal.SIGKILL
    assert "segment 1 (frames 16-" in info.value.message and "killed by SIGKILL" in info.value.message
    assert not any(pid_alive(pid) for pid in pids)
    assert_clean(work, out, output=False)


def test_exception_in_block_cleans_up(ffmpeg_exe, x264, tmp_path, work):
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="caller failed"):
        with SegmentedEncoder(out, W, H, 25, x264, ffmpeg_exe, workers=3, segment_frames=16, tmp_dir=work) as enc:
            enc.write(coded_frames(0, 60))
            # Segments whose frames are all written may already have finished (how many depends on
            # the host's speed); at least the last, partial one is still encoding.
            pids = enc.pids
            assert len(pids) >= 1
            raise RuntimeError("caller failed")
    assert not any(pid_alive(pid) for pid in pids)
    assert_clean(work, out, output=False)


def test_encoder_that_fails_to_open(ffmpeg_exe, tmp_path, work):
    out = tmp_path / "out.mp4"
    bad = EncoderChoice("libx264", ("-preset", "no-such-preset"))
    # Every segment's ffmpeg fails: the error names whichever was seen first.
    with pytest.raises(FFmpegError, match=r"segment \d+ \(frames \d+-\d+\) of .*out.mp4: .*no-such-preset"):
        with SegmentedEncoder(out, W, H, 25, bad, ffmpeg_exe, workers=2, segment_frames=16, tmp_dir=work) as enc:
            for start in range(0, 400, 8):
                enc.write(coded_frames(start, 8))
    assert_clean(work, out, output=False)


def test_malformed_frames_are_refused_before_queueing(ffmpeg_exe, x264, tmp_path, work):
    out = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match=r"expected uint8 frames \[b, 96, 128, 3\]"):
        with SegmentedEncoder(out, W, H, 25, x264, ffmpeg_exe, workers=2, segment_frames=16, tmp_dir=work) as enc:
            enc.write(coded_frames(0, 20))
            try:
                enc.write(coded_frames(0, 2, 64, 48))
            finally:
                assert enc.frames_written == 20
    assert_clean(work, out, output=False)


def test_timing_check_catches_a_dts_gap(ffmpeg_exe, x264, tmp_path):
    """The guard behind every join: a 1-frame last segment has no B-frame delay, so joining it
    as is leaves a dts gap (what MIN_SEGMENT_FRAMES prevents)."""
    parts = []
    for name, start, count in (("a.mp4", 0, 20), ("b.mp4", 20, 1)):
        with VideoEncoder(tmp_path / name, W, H, 25, x264, ffmpeg_exe) as enc:
            enc.write(coded_frames(start, count))
        parts.append(f"file '{tmp_path / name}'\n")
    (tmp_path / "list.txt").write_text("".join(parts))
    joined = tmp_path / "joined.mp4"
    listing = file_arg(tmp_path / "list.txt")
    run_ffmpeg(ffmpeg_exe, ["-f", "concat", "-safe", "0", "-i", listing, "-c", "copy", file_arg(joined)])
    with pytest.raises(FFmpegError, match="misplaced frame 20: dts"):
        _check_timing(joined, 21, Fraction(25), what="test")
    with pytest.raises(FFmpegError, match="gave 21 frames instead of 22"):
        _check_timing(joined, 22, Fraction(25), what="test")


def test_arguments_checked_up_front(ffmpeg_exe, x264, tmp_path):
    def make(**options):
        return SegmentedEncoder(tmp_path / "o.mp4", W, H, 25, x264, ffmpeg_exe, **{"workers": 2, **options})

    with pytest.raises(ValueError, match="segment_frames must be >= 16"):
        make(segment_frames=8)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        make(workers=0, segment_frames=16)
    with pytest.raises(ValueError, match="input_pix_fmt"):
        make(segment_frames=16, input_pix_fmt="rgb")
    with pytest.raises(OutputNotWritable, match="does not exist"):
        make(segment_frames=16, tmp_dir=tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


# --- worker heuristic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, cpus, workers",
    [
        (1920, 1080, 16, 4),
        (1920, 1080, 8, 4),
        (1920, 1080, 4, 2),
        (1920, 1080, 2, 1),
        (1920, 1080, None, 1),
        (3840, 2160, 64, 4),
        (1280, 720, 16, 2),
        (960, 540, 16, 1),
        (256, 256, 16, 1),
    ],
)
def test_encode_workers_for_bgr24(width, height, cpus, workers):
    assert encode_workers_for(width, height, cpus) == workers == encode_workers_for(width, height, cpus, "bgr24")


@pytest.mark.parametrize(
    "width, height, cpus, workers",
    [(1920, 1080, 16, 1), (2560, 1440, 16, 2), (3840, 2160, 16, 4), (3840, 2160, 4, 2), (1280, 720, 16, 1)],
)
def test_encode_workers_for_yuv420p_one_per_1080p_frame(width, height, cpus, workers):
    assert encode_workers_for(width, height, cpus, "yuv420p") == workers


def test_encode_workers_for_refuses_an_unknown_pixel_format():
    with pytest.raises(ValueError, match="pix_fmt"):
        encode_workers_for(1920, 1080, 16, "rgb24")
