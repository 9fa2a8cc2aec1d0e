"""The whole pipeline on real media with tiny random weights: frame counts, rates, A/V length,
ping-pong order, audio formats, pass-through of unchanged pixels and cleanup after failures."""

from __future__ import annotations

import os
import subprocess
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from musetalk_service.errors import BadAudio, FFmpegError, InvalidOption, NoVideoStream, NotAVideo
from musetalk_service.media.decode import VideoReader
from musetalk_service.media.encode import VideoEncoder, encoder_for
from musetalk_service.media.probe import count_video_frames, probe_audio, probe_video
from musetalk_service.contract import PHASES, LipsyncRequest
from musetalk_service.pipeline.source import pingpong_index
from tests.fixtures.processes import ffmpeg_children

FACE_BOX = (64, 72, 192, 224)
"""Inside the 256x256 test clips, around the astronaut's face."""

CODE_SIZE = 12
"""Side of the top-left patch whose grey level encodes a frame's index (outside any blend square)."""


def lipsync(pipeline, tmp_path: Path, video: Path, audio: Path, **options):
    request = LipsyncRequest.with_defaults(
        pipeline.settings.lipsync,
        video_path=video,
        audio_path=audio,
        output_path=tmp_path / "out.mp4",
        face_box=options.pop("face_box", FACE_BOX),
        **options,
    )
    return pipeline.run(request)


def decode_all(path: Path, ffmpeg: str) -> np.ndarray:
    info = probe_video(path)
    with VideoReader(path, info, None, ffmpeg) as reader:
        frames = reader.read(10_000)
        return frames.copy()


def indexed_video(path: Path, count: int, fps: Fraction, ffmpeg: str, settings) -> Path:
    """A video whose frame j carries grey level 20*j in its top-left patch: output order readable back."""
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, size=(256, 256, 3), dtype=np.uint8)
    choice = encoder_for("libx264", settings.encode)
    with VideoEncoder(path, 256, 256, fps, choice, ffmpeg) as encoder:
        for j in range(count):
            frame = base.copy()
            frame[:CODE_SIZE, :CODE_SIZE] = 20 * j
            encoder.write(frame)
    return path


def frame_codes(frames: np.ndarray) -> list[int]:
    return [int(round(float(f[2 : CODE_SIZE - 2, 2 : CODE_SIZE - 2].mean()) / 20)) for f in frames]


def test_output_has_floor_audio_times_fps_frames_the_rate_and_the_audio(tiny_pipeline, tmp_path, make_video, make_audio):
    video, audio = make_video(2.0, 25), make_audio(1.3, ".wav")
    result = lipsync(tiny_pipeline, tmp_path, video, audio)

    assert result.frames == 32  # floor(1.3 * 25)
    assert count_video_frames(result.output_path) == 32
    out = probe_video(result.output_path)
    assert out.fps == 25
    sound = probe_audio(result.output_path)
    assert sound.codec == "aac"  # WAV cannot ride in MP4 as-is
    assert abs(sound.duration_s - 1.3) < 0.05
    assert abs(out.duration_s - 32 / 25) < 1 / 25
    assert set(PHASES) | {"total"} <= set(result.timings)
    assert result.timings["total"] >= result.timings["unet"] > 0
    assert result.weights == "random" and result.encoder == "libx264"
    assert result.fallbacks == 0 and result.frames_without_face == 0


@pytest.mark.parametrize("fps", [Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30)])
def test_frame_rates_are_kept_exact(tiny_pipeline, tmp_path, make_video, make_audio, fps):
    video, audio = make_video(1.0, fps, (128, 128)), make_audio(1.0, ".wav")
    result = lipsync(tiny_pipeline, tmp_path, video, audio, face_box=(32, 32, 96, 112))

    expected = int(Fraction(1) * fps)  # floor(1.0 s * fps): 24, 25, 29, 30
    assert result.frames == expected
    assert count_video_frames(result.output_path) == expected
    assert probe_video(result.output_path).fps == fps
    assert result.fps == pytest.approx(float(fps))


def test_audio_longer_than_the_video_plays_it_forward_then_backward(tiny_pipeline, tmp_path, make_audio):
    ffmpeg = tiny_pipeline.ffmpeg
    video = indexed_video(tmp_path / "indexed.mp4", 10, Fraction(25), ffmpeg, tiny_pipeline.settings)
    result = lipsync(tiny_pipeline, tmp_path, video, make_audio(1.0, ".wav"))

    assert result.frames == 25
    codes = frame_codes(decode_all(result.output_path, ffmpeg))
    assert codes == [pingpong_index(i, 10) for i in range(25)]
    assert codes[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 8]


def test_audio_shorter_than_the_video_keeps_the_first_frames_in_order(tiny_pipeline, tmp_path, make_audio):
    ffmpeg = tiny_pipeline.ffmpeg
    video = indexed_video(tmp_path / "indexed.mp4", 12, Fraction(25), ffmpeg, tiny_pipeline.settings)
    result = lipsync(tiny_pipeline, tmp_path, video, make_audio(0.3, ".wav"))

    assert result.frames == 7
    assert frame_codes(decode_all(result.output_path, ffmpeg)) == list(range(7))


def test_pixels_outside_the_blend_square_are_the_source_pixels(tiny_pipeline, tmp_path, make_video, make_audio):
    video = make_video(1.0, 25, (256, 256), motion=False)
    result = lipsync(tiny_pipeline, tmp_path, video, make_audio(0.4, ".wav"))
    source = decode_all(video, tiny_pipeline.ffmpeg)[:10]
    output = decode_all(result.output_path, tiny_pipeline.ffmpeg)

    # Blend square of FACE_BOX: centre (128, 148), half side int(152 // 2 * 1.5) = 114 -> rows 34..262.
    outside = (slice(0, 30), slice(None))
    diff = np.abs(output[:, outside[0], outside[1]].astype(int) - source[:, outside[0], outside[1]].astype(int))
    assert diff.mean() < 3.5  # only the two codec round trips' rounding
    inside = np.abs(output[:, 150:220, 80:180].astype(int) - source[:, 150:220, 80:180].astype(int))
    assert inside.mean() > 5.0  # random weights repaint the mouth region


@pytest.mark.parametrize("ext, codec", [(".wav", "aac"), (".mp3", "mp3"), (".m4a", "aac"), (".ogg", "aac")])
def test_every_audio_format_is_muxed(tiny_pipeline, tmp_path, make_video, make_audio, ext, codec):
    result = lipsync(tiny_pipeline, tmp_path, make_video(1.0, 25, (128, 128)), make_audio(0.8, ext), face_box=(32, 32, 96, 112))

    # Lossy codecs trim or pad a few ms (encoder delay): the frame count follows the decoded length.
    assert abs(result.duration_s - 0.8) < 0.03
    assert result.frames == int(result.duration_s * 25) == count_video_frames(result.output_path)
    sound = probe_audio(result.output_path)
    assert sound.codec == codec
    assert abs(sound.duration_s - 0.8) < 0.06


def test_fps_option_resamples_the_video(tiny_pipeline, tmp_path, make_video, make_audio):
    result = lipsync(tiny_pipeline, tmp_path, make_video(1.0, 25, (128, 128)), make_audio(1.0, ".wav"), fps=30, face_box=(32, 32, 96, 112))

    assert result.frames == 30
    assert probe_video(result.output_path).fps == 30


def test_bad_inputs_raise_their_errors_and_write_nothing(tiny_pipeline, tmp_path, make_video, make_audio):
    video, audio = make_video(1.0, 25, (128, 128)), make_audio(0.5, ".wav")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    cases = [
        (dict(video=text, audio=audio), NotAVideo),
        (dict(video=audio, audio=audio), NoVideoStream),
        (dict(video=video, audio=video), BadAudio),  # the clip has no sound
        (dict(video=video, audio=audio, face_box=(200, 200, 300, 300)), InvalidOption),
    ]
    for case, error in cases:
        with pytest.raises(error):
            lipsync(tiny_pipeline, tmp_path, case["video"], case["audio"], **{k: v for k, v in case.items() if k == "face_box"})
        assert not (tmp_path / "out.mp4").exists()
    assert list(Path(tiny_pipeline.settings.work_dir).iterdir()) == []


def test_killing_ffmpeg_mid_encode_fails_cleanly(tiny_pipeline, tmp_path, make_video, make_audio):
    """The encoder dies under the pipeline: FFmpegError, no output, no temp files, no ffmpeg left."""
    video, audio = make_video(2.0, 25, (128, 128)), make_audio(2.0, ".wav")
    killed = threading.Event()

    def kill_encoder(phase: str, done: int, total: int) -> None:
        if phase == "frames" and not killed.is_set():
            for pid, _ in ffmpeg_children():
                os.kill(pid, 9)
            killed.set()

    request = LipsyncRequest.with_defaults(
        tiny_pipeline.settings.lipsync, video_path=video, audio_path=audio, output_path=tmp_path / "out.mp4",
        face_box=(32, 32, 96, 112), batch_size=4,
    )
    with pytest.raises(FFmpegError) as failure:
        tiny_pipeline.run(request, progress=kill_encoder)

    assert killed.is_set()
    assert "-9" in str(failure.value) or "SIGKILL" in str(failure.value) or "killed" in str(failure.value).lower()
    assert not (tmp_path / "out.mp4").exists()
    assert list(tmp_path.iterdir()) == []
    assert list(Path(tiny_pipeline.settings.work_dir).iterdir()) == []
    assert ffmpeg_children() == []


def test_cancel_stops_the_run_between_batches_and_leaves_nothing(tiny_pipeline, tmp_path, make_video, make_audio):
    from musetalk_service.errors import Cancelled

    cancel = threading.Event()
    seen = []

    def cancel_after_first_batch(phase: str, done: int, total: int) -> None:
        if phase == "frames":
            seen.append(done)
            cancel.set()

    request = LipsyncRequest.with_defaults(
        tiny_pipeline.settings.lipsync, video_path=make_video(2.0, 25, (128, 128)), audio_path=make_audio(2.0, ".wav"),
        output_path=tmp_path / "out.mp4", face_box=(32, 32, 96, 112), batch_size=4,
    )
    with pytest.raises(Cancelled):
        tiny_pipeline.run(request, progress=cancel_after_first_batch, cancel=cancel)

    assert seen and seen[-1] < 50  # stopped well before the 50 frames
    assert list(tmp_path.iterdir()) == []
    assert list(Path(tiny_pipeline.settings.work_dir).iterdir()) == []
    assert ffmpeg_children() == []


def test_a_video_seen_before_reuses_its_avatar(tiny_pipeline, tmp_path, make_video, make_audio):
    """Same video, same options: no face, VAE-encode or parsing work the second time, same frames."""
    video = make_video(1.2, 25, (128, 128))
    for name in "abc":
        (tmp_path / name).mkdir()
    first = lipsync(tiny_pipeline, tmp_path / "a", video, make_audio(0.6, ".wav"), face_box=(32, 32, 96, 112), mask_every=3)
    hits = tiny_pipeline.avatars.stats()["hits"]
    second = lipsync(tiny_pipeline, tmp_path / "b", video, make_audio(0.6, ".wav"), face_box=(32, 32, 96, 112), mask_every=3)

    assert tiny_pipeline.avatars.stats()["hits"] == hits + 1
    assert second.avatar_id == first.avatar_id
    assert second.timings["vae_encode"] == 0 and second.timings["face_detect"] == 0
    assert first.timings["vae_encode"] > 0
    a = decode_all(first.output_path, tiny_pipeline.ffmpeg)
    b = decode_all(second.output_path, tiny_pipeline.ffmpeg)
    assert np.array_equal(a, b)

    changed = lipsync(tiny_pipeline, tmp_path / "c", video, make_audio(0.6, ".wav"), face_box=(32, 32, 96, 112), mask_every=4)
    assert changed.avatar_id != first.avatar_id  # options changed: a new preparation
    assert changed.timings["vae_encode"] > 0


def test_a_request_can_name_a_prepared_avatar_instead_of_a_video(tiny_pipeline, tmp_path, make_video, make_audio):
    video = make_video(1.0, 25, (128, 128))
    prepare = LipsyncRequest.with_defaults(
        tiny_pipeline.settings.lipsync, video_path=video, audio_path=None, output_path=None, face_box=(32, 32, 96, 112)
    )
    avatar = tiny_pipeline.prepare_avatar(prepare)
    assert avatar.frame_count == 25
    assert any(entry["key"] == avatar.key for entry in tiny_pipeline.list_avatars())

    request = LipsyncRequest.with_defaults(
        tiny_pipeline.settings.lipsync, video_path=None, avatar_id=avatar.key, audio_path=make_audio(0.4, ".wav"),
        output_path=tmp_path / "out.mp4",
    )
    result = tiny_pipeline.run(request)
    assert result.avatar_id == avatar.key and result.frames == 10
    assert result.timings["vae_encode"] == 0

    assert tiny_pipeline.delete_avatar(avatar.key)
    from musetalk_service.errors import AvatarNotFound

    with pytest.raises(AvatarNotFound):
        tiny_pipeline.run(request)


def test_parallel_segment_encoders_give_one_exact_output(tiny_models_dir, tmp_path, make_video, make_audio):
    """encode.workers > 1: segments encoded concurrently, joined without re-encoding, frames exact."""
    from musetalk_service.pipeline.runner import LipsyncPipeline
    from musetalk_service.settings import load_settings

    settings = load_settings(models_dir=tiny_models_dir, device="cpu", work_dir=tmp_path / "work")
    (tmp_path / "work").mkdir()
    settings = settings.model_copy(update={"encode": settings.encode.model_copy(update={"workers": 2, "segment_frames": 16})})
    pipeline = LipsyncPipeline.load(settings)
    ffmpeg = pipeline.ffmpeg
    video = indexed_video(tmp_path / "indexed.mp4", 12, Fraction(25), ffmpeg, settings)
    result = lipsync(pipeline, tmp_path, video, make_audio(2.0, ".wav"))

    assert result.frames == 50
    assert count_video_frames(result.output_path) == 50
    assert frame_codes(decode_all(result.output_path, ffmpeg)) == [pingpong_index(i, 12) for i in range(50)]
    assert list((tmp_path / "work").iterdir()) == []



@pytest.fixture(scope="module")
def lossless_pipelines(tiny_settings):
    """The numpy and the device compose path (`compose: device`, torch on the CPU), both encoding
    losslessly (x264 at crf 0), so outputs compare composite to composite."""
    from musetalk_service.pipeline.runner import LipsyncPipeline

    lossless = tiny_settings.encode.model_copy(update={"x264_crf": 0})
    return {
        compose: LipsyncPipeline.load(tiny_settings.model_copy(update={"compose": compose, "encode": lossless}))
        for compose in ("numpy", "device")
    }


def _count_calls(monkeypatch, cls, names: tuple[str, ...]) -> dict[str, int]:
    """Count calls of `cls`'s methods `names` (still calling them) for the test's duration."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(cls, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)
    return calls


def test_device_compose_gives_the_numpy_paths_frames(lossless_pipelines, tmp_path, make_video, make_audio, monkeypatch):
    """A BT.709 yuv420p video, new (decoded as yuv420p, made BGR on the device for the crops and
    masks, only the masked tiles blended), then again (its prepared avatar): both leave every
    sample outside the blend masks as decoded, and inside give the numpy blend's composite but for
    the base pixels' chroma upsampling (nearest on the device, filtered in ffmpeg's BGR decode)."""
    from musetalk_service.pipeline.compose import GpuComposer
    from musetalk_service.pipeline.frames import DeviceFrameUploader

    calls = _count_calls(monkeypatch, GpuComposer, ("compose", "compose_yuv"))
    uploads = _count_calls(monkeypatch, DeviceFrameUploader, ("__call__",))
    video, audio = make_video(1.2, 25, (256, 256)), make_audio(0.8, ".wav")
    runs = [("numpy", "numpy"), ("new", "device"), ("prepared", "device")]
    outputs = {}
    for run, compose in runs:
        (tmp_path / run).mkdir()
        pipeline = lossless_pipelines[compose]
        result = lipsync(pipeline, tmp_path / run, video, audio)
        assert result.frames == 20 and count_video_frames(result.output_path) == 20
        outputs[run] = _decode_yuv(result.output_path)
        if run == "new":
            # Each batch of the output, then the video's last 10 frames for its avatar.
            assert calls == {"compose": 0, "compose_yuv": 2} and uploads == {"__call__": 3}
    assert calls == {"compose": 0, "compose_yuv": 4} and uploads == {"__call__": 3}
    assert result.timings["vae_encode"] == 0  # the prepared avatar was used
    planes = {run: _yuv_planes(out) for run, out in outputs.items()}
    source = _yuv_planes(_decode_yuv(video)[:20])
    x1, y1, x2, y2 = FACE_BOX
    for k, name in enumerate("YUV"):
        scale = 1 if k == 0 else 2
        box = np.zeros(source[k].shape[1:], bool)
        box[y1 // scale : -(-y2 // scale), x1 // scale : -(-x2 // scale)] = True
        # Outside the face box the source's samples, exactly (the numpy path's decode to BGR and
        # back moves them by up to ~10 levels)...
        for run in ("new", "prepared"):
            assert np.array_equal(planes[run][k][:, ~box], source[k][:, ~box]), (run, name)
        assert not np.array_equal(planes["numpy"][k][:, ~box], source[k][:, ~box]), name
        # ... the prepared avatar gives what the new video gave...
        assert np.abs(planes["prepared"][k] - planes["new"][k]).max() <= 1, name
        # ... and inside the box the numpy blend's composite, up to the chroma upsampling: of the
        # base pixels, and of the crops the VAE saw, which the random weights' faces amplify
        # (measured: Y 1.6 levels on average, 5 at the 99th percentile; U and V 0.4 and 3).
        inside = np.abs(planes["new"][k] - planes["numpy"][k])[:, box]
        assert inside.mean() < 2 and np.percentile(inside, 99) <= 6, name


def test_device_compose_of_a_video_it_cannot_pass_through(lossless_pipelines, tmp_path, make_video, make_audio, monkeypatch, ffmpeg_exe):
    """A 4:4:4 video can't pass its planes to the encoder: its frames are decoded to BGR, composed
    whole on the device (`GpuComposer.compose`), and come out as the numpy blend's (the numpy
    composite as ffmpeg converts it, truncating, against ours, rounding)."""
    from musetalk_service.pipeline.compose import GpuComposer

    calls = _count_calls(monkeypatch, GpuComposer, ("compose", "compose_yuv"))
    video = tmp_path / "yuv444.mp4"
    subprocess.run(
        [ffmpeg_exe, "-loglevel", "error", "-i", str(make_video(1.2, 25, (256, 256))), "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p", str(video)],
        check=True,
    )  # fmt: skip
    assert not probe_video(video).is_bt709_yuv420p
    audio = make_audio(0.8, ".wav")
    outputs = {}
    for compose in ("numpy", "device"):
        (tmp_path / compose).mkdir()
        result = lipsync(lossless_pipelines[compose], tmp_path / compose, video, audio)
        outputs[compose] = _yuv_planes(_decode_yuv(result.output_path))
    assert calls == {"compose": 2, "compose_yuv": 0}
    for k, name in enumerate("YUV"):
        assert np.abs(outputs["device"][k] - outputs["numpy"][k]).max() <= 2, name


def _decode_yuv(path: Path) -> np.ndarray:
    info = probe_video(path)
    with VideoReader(path, info, None, None, "yuv420p") as reader:
        return reader.read(10_000).copy()


def _yuv_planes(frames: np.ndarray) -> list[np.ndarray]:
    from musetalk_service.pipeline.colour import yuv420p_planes

    return [np.stack(p).astype(int) for p in zip(*(yuv420p_planes(f, 256, 256) for f in frames))]


def test_running_out_of_gpu_memory_names_the_cap_and_leaves_nothing(tiny_pipeline, tmp_path, make_video, make_audio, monkeypatch):
    """torch's OutOfMemoryError (raised here by hand: a CPU has no GPU to fill) comes out as the
    service's error naming the setting, with nothing left behind."""
    import torch

    import musetalk_service.pipeline.generate as generate
    from musetalk_service.errors import GpuMemoryExhausted

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(generate, "generate_faces", out_of_memory)
    request = LipsyncRequest.with_defaults(
        tiny_pipeline.settings.lipsync, video_path=make_video(1.0, 25, (128, 128)), audio_path=make_audio(1.0, ".wav"),
        output_path=tmp_path / "out.mp4", face_box=(32, 32, 96, 112), batch_size=4,
    )
    with pytest.raises(GpuMemoryExhausted, match=r"gpu_memory_gb=8 allows \(CUDA out of memory. Tried to allocate 2.00 GiB\)$") as failure:
        tiny_pipeline.run(request)
    assert failure.value.status == 503 and failure.value.code == "gpu_memory_exhausted"
    assert list(tmp_path.iterdir()) == []
    assert list(Path(tiny_pipeline.settings.work_dir).iterdir()) == []
    assert ffmpeg_children() == []
