"""Probing: exact frame rates, counts, display size, and a clear error for every bad input."""

from __future__ import annotations

from fractions import Fraction

import cv2
import numpy as np
import pytest

from musetalk_service.errors import BadAudio, InputFileNotFound, NotAVideo, NoVideoStream
from musetalk_service.media.ffmpeg import file_arg, run_ffmpeg
from musetalk_service.media.probe import count_video_frames, probe_audio, probe_video

from .conftest import lavfi_video


@pytest.mark.parametrize(
    "fps", [Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30), Fraction(24000, 1001)], ids=str
)
def test_probe_keeps_fps_exact(make_video, fps):
    path = make_video(1.0, fps, (128, 96), motion=False)
    info = probe_video(path)
    assert info.fps == fps and isinstance(info.fps, Fraction)
    assert info.frame_count == round(fps) == count_video_frames(path)
    assert (info.width, info.height) == (128, 96)
    assert info.duration_s == pytest.approx(float(round(fps) / fps), abs=1e-3)
    assert (info.codec, info.pix_fmt, info.rotation, info.is_image) == ("h264", "yuv420p", 0, False)


def test_probe_ten_bit(ffmpeg_exe, tmp_path):
    path = lavfi_video(
        ffmpeg_exe, tmp_path / "ten.mp4", "testsrc2=size=320x240:rate=25:duration=1", pix_fmt="yuv420p10le"
    )
    info = probe_video(path)
    assert info.pix_fmt == "yuv420p10le" and info.frame_count == 25


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_probe_reports_display_size(ffmpeg_exe, tmp_path, make_video, rotation):
    src = make_video(1.0, 25, (160, 96), motion=False)
    rotated = tmp_path / "rotated.mp4"
    run_ffmpeg(ffmpeg_exe, ["-display_rotation", str(rotation), "-i", file_arg(src), "-c", "copy", file_arg(rotated)])
    info = probe_video(rotated)
    assert info.rotation == rotation
    assert (info.width, info.height) == ((96, 160) if rotation != 180 else (160, 96))


def test_still_image_is_one_frame_at_25_fps(tmp_path):
    path = tmp_path / "face.png"
    cv2.imwrite(str(path), np.full((51, 77, 3), 99, np.uint8))
    info = probe_video(path)
    assert (info.width, info.height, info.fps, info.frame_count, info.is_image) == (77, 51, 25, 1, True)
    assert count_video_frames(path) == 1


def test_probe_audio_formats(make_audio):
    expected = {".wav": "pcm_s16le", ".mp3": "mp3", ".m4a": "aac", ".ogg": "vorbis", ".opus": "opus"}
    for ext, codec in expected.items():
        info = probe_audio(make_audio(2.0, ext))
        assert info.codec == codec
        assert info.channels == 1
        assert info.duration_s == pytest.approx(2.0, abs=0.03), ext


def test_probe_audio_of_a_video_with_sound(talking_head_video_with_audio):
    info = probe_audio(talking_head_video_with_audio)
    assert info.codec == "aac" and info.duration_s == pytest.approx(2.0, abs=0.03)


# --- bad inputs -------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    for probe, kind in ((probe_video, "video"), (probe_audio, "audio"), (count_video_frames, "video")):
        with pytest.raises(InputFileNotFound, match=f"{kind} file not found: .*nope.mp4"):
            probe(tmp_path / "nope.mp4")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(InputFileNotFound, match="not a regular file"):
        probe_video(tmp_path)


def test_zero_byte_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(NotAVideo, match=r"empty.mp4 is empty \(0 bytes\)"):
        probe_video(empty)
    with pytest.raises(BadAudio, match=r"empty \(0 bytes\)"):
        probe_audio(empty)


def test_text_file_named_mp4(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(NotAVideo, match="notes.mp4 is not a readable video file"):
        probe_video(text)
    with pytest.raises(BadAudio, match="notes.mp4 is not a readable audio file"):
        probe_audio(text)


def test_text_file_named_txt(tmp_path):
    """ffmpeg's tty demuxer would render a .txt file as a video of ANSI art."""
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 100)
    with pytest.raises(NotAVideo, match="notes.txt is a text file, not a video"):
        probe_video(text)


def test_truncated_mp4_without_index(ffmpeg_exe, tmp_path):
    """Plain ffmpeg output keeps the index (moov) at the end: cut it off and nothing is readable."""
    whole = lavfi_video(ffmpeg_exe, tmp_path / "whole.mp4", "testsrc2=size=320x240:rate=25:duration=1")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(NotAVideo, match="cut.mp4 is not a readable video file"):
        probe_video(cut)


def test_truncated_faststart_mp4(talking_head_video, tmp_path):
    """Index first (faststart): the header survives the cut, but the index points past the end."""
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(talking_head_video.read_bytes()[: talking_head_video.stat().st_size // 2])
    with pytest.raises(NotAVideo, match="cut.mp4 is truncated"):
        probe_video(cut)


def test_audio_file_as_video(speech_wav, speech_mp3):
    for path in (speech_wav, speech_mp3):
        with pytest.raises(NoVideoStream, match=rf"{path.name} has no video stream \(it holds: audio\)"):
            probe_video(path)


def test_video_without_audio_as_audio(talking_head_video):
    with pytest.raises(BadAudio, match=rf"{talking_head_video.name} has no audio stream \(it holds: video\)"):
        probe_audio(talking_head_video)


def test_empty_audio(make_audio):
    with pytest.raises(BadAudio, match="contains no samples"):
        probe_audio(make_audio(0, ".wav"))


@pytest.mark.parametrize(
    "tags, pix_fmt, expected, passes_through",
    [
        ([], "yuv420p", ("unspecified", "unspecified"), True),
        (["-colorspace", "bt709", "-color_range", "tv"], "yuv420p", ("bt709", "tv"), True),
        (["-colorspace", "smpte170m", "-color_range", "tv"], "yuv420p", ("smpte170m", "tv"), False),
        (["-colorspace", "bt709", "-color_range", "pc"], "yuv420p", ("bt709", "pc"), False),
        (["-colorspace", "bt709", "-color_range", "tv"], "yuv444p", ("bt709", "tv"), False),
    ],
    ids=["untagged", "bt709", "bt601", "full-range", "444"],
)
def test_probe_reports_colour_tags_and_whether_planes_can_pass_through(ffmpeg_exe, tmp_path, tags, pix_fmt, expected, passes_through):
    path = lavfi_video(ffmpeg_exe, tmp_path / "tagged.mp4", "testsrc2=size=64x48:rate=25:duration=0.2", pix_fmt=pix_fmt, after=tags)
    info = probe_video(path)
    assert (info.colorspace, info.color_range) == expected
    assert info.is_bt709_yuv420p is passes_through


def test_an_odd_sided_stream_does_not_pass_its_planes_through(ffmpeg_exe, tmp_path):
    from dataclasses import replace

    info = probe_video(lavfi_video(ffmpeg_exe, tmp_path / "even.mp4", "testsrc2=size=64x48:rate=25:duration=0.2"))
    assert info.is_bt709_yuv420p
    assert not replace(info, width=63).is_bt709_yuv420p and not replace(info, height=47).is_bt709_yuv420p
