"""Muxing speech onto the rendered video: streams, copy vs AAC, exact duration, atomic output;
the speech track made beside the video (`Mp4Audio`)."""

from __future__ import annotations

from fractions import Fraction

import av
import pytest

from musetalk_service.errors import BadAudio, FFmpegError, NoVideoStream, OutputNotWritable
from musetalk_service.media.ffmpeg import file_arg, run_ffmpeg
from musetalk_service.media.mux import Mp4Audio, mux_audio
from musetalk_service.media.probe import AudioInfo, count_video_frames, probe_audio
from tests.fixtures.processes import ffmpeg_children

from .conftest import lavfi_video

FPS = Fraction(30000, 1001)
AUDIO_S = 1.9
FRAMES = 56  # floor(1.9 s * 29.97 fps): what the pipeline renders for this audio


@pytest.fixture(scope="module")
def rendered_video(make_video):
    """Video only, FRAMES frames at 29.97 fps, as the encoder leaves it before the mux."""
    path = make_video(FRAMES / FPS, FPS, (128, 128))
    assert count_video_frames(path) == FRAMES
    return path


def _packets(path, kind: str) -> list[bytes]:
    with av.open(str(path)) as container:
        stream = getattr(container.streams, kind)[0]
        return [bytes(p) for p in container.demux(stream) if p.size]


@pytest.mark.parametrize(
    "ext, codec, copied",
    [
        (".wav", "aac", False),
        (".m4a", "aac", True),
        (".mp3", "mp3", True),
        (".ogg", "aac", False),
        (".opus", "opus", True),
        (".flac", "aac", False),
    ],
)
def test_mux(ffmpeg_exe, make_audio, rendered_video, tmp_path, ext, codec, copied):
    audio = make_audio(AUDIO_S, ext)
    out = tmp_path / "out.mp4"
    mux_audio(rendered_video, audio, out, ffmpeg_exe)

    with av.open(str(out)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        total_s = container.duration / av.time_base
    assert count_video_frames(out) == FRAMES
    assert _packets(out, "video") == _packets(rendered_video, "video")  # copied, not re-encoded
    info = probe_audio(out)
    assert info.codec == codec
    if copied:
        assert _packets(out, "audio") == _packets(audio, "audio")
    assert abs(total_s - probe_audio(audio).duration_s) <= 1 / FPS
    assert abs(info.duration_s - probe_audio(audio).duration_s) <= 1 / FPS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temp left


def test_audio_from_a_video_file(ffmpeg_exe, talking_head_video_with_audio, rendered_video, tmp_path):
    mux_audio(rendered_video, talking_head_video_with_audio, tmp_path / "out.mp4", ffmpeg_exe)
    assert probe_audio(tmp_path / "out.mp4").codec == "aac"


def test_replaces_existing_output(ffmpeg_exe, speech_wav, rendered_video, tmp_path):
    out = tmp_path / "out.mp4"
    out.write_text("old result")
    mux_audio(rendered_video, speech_wav, out, ffmpeg_exe)
    assert count_video_frames(out) == FRAMES


def test_nonexistent_output_dir(ffmpeg_exe, speech_wav, rendered_video, tmp_path):
    with pytest.raises(OutputNotWritable, match="does not exist"):
        mux_audio(rendered_video, speech_wav, tmp_path / "no" / "out.mp4", ffmpeg_exe)
    assert list(tmp_path.iterdir()) == []


def test_readonly_output_dir(ffmpeg_exe, speech_wav, rendered_video, readonly_dir):
    before = sorted(p.name for p in readonly_dir.iterdir())
    with pytest.raises(OutputNotWritable, match="is not writable"):
        mux_audio(rendered_video, speech_wav, readonly_dir / "out.mp4", ffmpeg_exe)
    assert sorted(p.name for p in readonly_dir.iterdir()) == before


def test_bad_inputs_fail_before_ffmpeg(ffmpeg_exe, speech_wav, rendered_video, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(NoVideoStream):
        mux_audio(speech_wav, speech_wav, out_dir / "out.mp4", ffmpeg_exe)
    with pytest.raises(BadAudio, match="has no audio stream"):
        mux_audio(rendered_video, rendered_video, out_dir / "out.mp4", ffmpeg_exe)
    assert list(out_dir.iterdir()) == []


def test_ffmpeg_failure_leaves_nothing(ffmpeg_exe, speech_wav, tmp_path):
    """Theora can't be copied into MP4: ffmpeg fails after creating its output; the temp file
    goes and the existing output stays as it was."""
    src = tmp_path / "src"
    src.mkdir()
    theora = src / "video.ogv"
    run_ffmpeg(
        ffmpeg_exe,
        ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=0.4", "-c:v", "libtheora", file_arg(theora)],
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "out.mp4").write_text("previous")
    with pytest.raises(FFmpegError, match="codec not currently supported in container"):
        mux_audio(theora, speech_wav, out_dir / "out.mp4", ffmpeg_exe)
    assert [p.name for p in out_dir.iterdir()] == ["out.mp4"]
    assert (out_dir / "out.mp4").read_text() == "previous"


def test_mux_is_not_truncated_to_the_video(ffmpeg_exe, make_audio, tmp_path):
    """No -shortest: a 1 s video under 2 s of speech gives a 2 s file."""
    video = lavfi_video(ffmpeg_exe, tmp_path / "short.mp4", "testsrc2=size=64x48:rate=25:duration=1")
    mux_audio(video, make_audio(2.0, ".wav"), tmp_path / "out.mp4", ffmpeg_exe)
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert container.duration / av.time_base == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize("ext, encoded", [(".wav", True), (".flac", True), (".mp3", False), (".m4a", False)])
def test_mp4_audio_is_the_track_the_mux_copies(ffmpeg_exe, make_audio, rendered_video, tmp_path, ext, encoded):
    """A codec MP4 takes is the request's own file; another is AAC made in the work folder, whole,
    and the mux then copies it rather than encoding again."""
    audio = make_audio(AUDIO_S, ext)
    work = tmp_path / "work"
    work.mkdir()
    with Mp4Audio(audio, probe_audio(audio), work, ffmpeg_exe) as speech:
        track = speech.path()
    if encoded:
        assert track.parent == work
        assert probe_audio(track).codec == "aac"
        assert abs(probe_audio(track).duration_s - probe_audio(audio).duration_s) <= 1 / FPS
    else:
        assert track == audio
        assert list(work.iterdir()) == []
    out = tmp_path / "out.mp4"
    mux_audio(rendered_video, track, out, ffmpeg_exe)
    assert _packets(out, "audio") == _packets(track, "audio")
    assert ffmpeg_children() == []


def test_mp4_audio_stops_its_encoder_when_the_request_fails(ffmpeg_exe, make_audio, tmp_path):
    audio = make_audio(20.0, ".wav")
    with pytest.raises(RuntimeError, match="the video failed"):
        with Mp4Audio(audio, probe_audio(audio), tmp_path, ffmpeg_exe):
            assert len(ffmpeg_children()) == 1  # encoding beside the caller's work
            raise RuntimeError("the video failed")
    assert ffmpeg_children() == []  # killed and reaped, not left running or as a zombie


def test_mp4_audio_reports_a_failed_encoding(ffmpeg_exe, tmp_path):
    not_audio = tmp_path / "speech.wav"
    not_audio.write_text("not a WAV file")
    with Mp4Audio(not_audio, AudioInfo("pcm_s16le", 16000, 1, 1.0), tmp_path, ffmpeg_exe) as speech:
        with pytest.raises(FFmpegError, match="encoding .*speech.wav to AAC"):
            speech.path()
    assert ffmpeg_children() == []
