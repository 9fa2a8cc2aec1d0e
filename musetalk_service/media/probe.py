"""What a media file holds, read with PyAV (no ffprobe on the target machines).

Probing opens the container and decodes one frame: that proves the stream is decodable (a valid
header over garbage fails here, with a clear error, instead of deep in the pipeline) and is the
only place PyAV exposes the display rotation.

Still images (png, jpg, webp, ...) are accepted as a one-frame video at 25 fps (`is_image`), the
rate MuseTalk was trained at, so an avatar photo works like a video.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from musetalk_service.errors import BadAudio, InputFileNotFound, NotAVideo, NoVideoStream

logger = logging.getLogger(__name__)

IMAGE_FPS = Fraction(25)
"""The frame rate given to a still image."""

# ffmpeg "decodes" text files (.txt, .ans, .bin) as rendered ANSI/text-mode art; not a face video.
_TEXT_ART_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})
_MAX_SANE_FPS = 1000
# An average rate within this relative distance of the nominal (r_frame_rate) one is the nominal
# rate measured with rounding; the nominal rate is exact (30000/1001, not 2997/100).
_NOMINAL_SNAP = Fraction(1, 200)
# libavutil's AVColorSpace and AVColorRange codes, by ffmpeg's option names (av gives the codes).
_COLORSPACES = {0: "gbr", 1: "bt709", 2: "unspecified", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 9: "bt2020nc", 10: "bt2020c"}
_COLOR_RANGES = {0: "unspecified", 1: "tv", 2: "pc"}


@dataclass(frozen=True)
class VideoInfo:
    """The first real video stream of a file (cover-art pictures are skipped)."""

    width: int
    """As displayed: coded width, or coded height when rotated by 90/270 degrees."""
    height: int
    fps: Fraction
    frame_count: int
    """The container's frame count when it records one, else round(duration_s * fps)."""
    duration_s: float
    codec: str
    pix_fmt: str
    rotation: int
    """Counter-clockwise display rotation in degrees, in [0, 360); ffmpeg's autorotate undoes it."""
    stream_index: int
    """Absolute index of the stream in the container (for `-map 0:<index>`)."""
    is_image: bool = False
    colorspace: str = "unspecified"
    """YCbCr matrix the stream is tagged with, in ffmpeg's names ('bt709', 'bt470bg', ...)."""
    color_range: str = "unspecified"
    """'tv' (limited), 'pc' (full) or 'unspecified'."""

    @property
    def is_bt709_yuv420p(self) -> bool:
        """Whether the decoded planes already are what the encoder writes (8-bit 4:2:0, BT.709,
        limited range, even sides), so they can pass through untouched. An untagged stream counts
        as BT.709 limited, as HD players show it and as `media.decode` converts it. (ffmpeg trims
        an odd side of yuv420p output: such a stream goes through BGR, which keeps it.)"""
        return (
            self.pix_fmt == "yuv420p"
            and self.width % 2 == 0
            and self.height % 2 == 0
            and self.colorspace in ("bt709", "unspecified")
            and self.color_range in ("tv", "unspecified")
        )


@dataclass(frozen=True)
class AudioInfo:
    """The first audio stream of a file."""

    codec: str
    sample_rate: int
    channels: int
    duration_s: float


def _check_file(path: str | os.PathLike, kind: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputFileNotFound(f"{kind} file not found: {p}")
    if not p.is_file():
        raise InputFileNotFound(f"{kind} path is not a regular file: {p}")
    if not os.access(p, os.R_OK):
        raise InputFileNotFound(f"{kind} file is not readable by the service: {p}")
    return p


def _open(path: Path, error: type[Exception], kind: str) -> av.container.InputContainer:
    if path.stat().st_size == 0:
        raise error(f"{path} is empty (0 bytes), not a {kind} file")
    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not a readable {kind} file: {_av_reason(exc)}") from None


def _av_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _is_image(container: av.container.InputContainer) -> bool:
    name = container.format.name
    return name == "image2" or name.endswith("_pipe")


def _stream_duration(stream: av.stream.Stream, container: av.container.InputContainer) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _valid_rate(rate: Fraction | None) -> bool:
    return rate is not None and 0 < rate <= _MAX_SANE_FPS


def _frame_rate(stream: av.video.stream.VideoStream, path: Path) -> Fraction:
    """The stream's average rate, snapped to its nominal rate when they agree; falls back to the
    guessed and nominal rates, then to 25 fps."""
    average, nominal = stream.average_rate, stream.base_rate
    if _valid_rate(average):
        if _valid_rate(nominal) and abs(average - nominal) <= nominal * _NOMINAL_SNAP:
            return Fraction(nominal)
        return Fraction(average)
    for rate in (stream.guessed_rate, nominal):
        if _valid_rate(rate):
            return Fraction(rate)
    logger.warning("%s: no usable frame rate in the container; assuming %s fps", path, IMAGE_FPS)
    return IMAGE_FPS


def _check_not_truncated(stream: av.stream.Stream, path: Path, error: type[Exception], kind: str) -> None:
    """Fail when the container's index points past the end of the file (a cut-off upload whose
    header survived, e.g. a faststart MP4): decoding would silently stop early."""
    end = max((entry.pos + entry.size for entry in stream.index_entries if entry.pos >= 0), default=0)
    size = path.stat().st_size
    if end > size:
        raise error(f"{path} is truncated: its {kind} data runs to byte {end} but the file has {size} bytes")


def _first_frame(container: av.container.InputContainer, stream: av.stream.Stream, path: Path, error, kind: str):
    try:
        for frame in container.decode(stream):
            return frame
    except av.error.FFmpegError as exc:
        raise error(f"{path}: the {kind} stream can't be decoded: {_av_reason(exc)}") from None
    return None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Describe the first video stream of `path` (a video container or a still image).

    Raises `InputFileNotFound` (missing, not a file, unreadable), `NotAVideo` (not a media file,
    or its video can't be decoded) and `NoVideoStream` (e.g. an audio-only file).
    """
    p = _check_file(path, "video")
    with _open(p, NotAVideo, "video") as container:
        stream = _video_stream(container)
        if stream is None:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise NoVideoStream(f"{p} has no video stream (it holds: {', '.join(kinds)})")
        if stream.codec_context.codec.canonical_name in _TEXT_ART_CODECS:
            raise NotAVideo(f"{p} is a text file, not a video")
        _check_not_truncated(stream, p, NotAVideo, "video")
        first = _first_frame(container, stream, p, NotAVideo, "video")
        if first is None:
            raise NotAVideo(f"{p}: the video stream has no decodable frames")
        rotation = round(first.rotation) % 360
        coded_w, coded_h = first.width, first.height
        if _is_image(container):
            fps, frame_count, duration = IMAGE_FPS, 1, float(1 / IMAGE_FPS)
        else:
            fps = _frame_rate(stream, p)
            duration = _stream_duration(stream, container)
            frame_count = stream.frames or (round(duration * fps) if duration else 0)
            if duration is None:
                duration = float(frame_count / fps)
        if rotation % 90:
            # ffmpeg's autorotate leaves odd angles alone, so the frames stay as coded.
            logger.warning("%s: display rotation of %d degrees is not a multiple of 90; ignored", p, rotation)
        swap = rotation in (90, 270)
        return VideoInfo(
            width=coded_h if swap else coded_w,
            height=coded_w if swap else coded_h,
            fps=fps,
            frame_count=int(frame_count),
            duration_s=float(duration),
            codec=stream.codec_context.codec.canonical_name,
            pix_fmt=first.format.name,
            rotation=rotation,
            stream_index=stream.index,
            is_image=_is_image(container),
            colorspace=_COLORSPACES.get(first.colorspace, "other"),
            color_range=_COLOR_RANGES.get(first.color_range, "other"),
        )


def probe_audio(path: str | os.PathLike) -> AudioInfo:
    """Describe the first audio stream of `path` (an audio file or a video with sound).

    Raises `InputFileNotFound` and `BadAudio` (not a media file, no audio stream, undecodable, or
    no samples at all).
    """
    p = _check_file(path, "audio")
    with _open(p, BadAudio, "audio") as container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise BadAudio(f"{p} has no audio stream (it holds: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        _check_not_truncated(stream, p, BadAudio, "audio")
        first = _first_frame(container, stream, p, BadAudio, "audio")
        if first is None or first.samples == 0:
            raise BadAudio(f"{p}: the audio stream contains no samples")
        duration = _stream_duration(stream, container)
        if duration is None:
            duration = _demuxed_duration(p, stream.index)
        ctx = stream.codec_context
        return AudioInfo(
            codec=ctx.codec.canonical_name,
            sample_rate=int(ctx.sample_rate or first.sample_rate),
            channels=int(ctx.channels),
            duration_s=duration,
        )


def _demuxed_duration(path: Path, index: int) -> float:
    """Sum of packet durations, for containers (raw ADTS, some ogg) that record no duration."""
    with av.open(str(path)) as container:
        stream = container.streams[index]
        ticks = sum(packet.duration or 0 for packet in container.demux(stream))
        return float(ticks * stream.time_base)


def count_video_frames(path: str | os.PathLike) -> int:
    """Exact number of frames in the first video stream, by demuxing every packet (no decoding).

    For checking outputs: as slow as reading the file, but independent of container metadata.
    """
    p = _check_file(path, "video")
    with _open(p, NotAVideo, "video") as container:
        stream = _video_stream(container)
        if stream is None:
            raise NoVideoStream(f"{p} has no video stream")
        return sum(1 for packet in container.demux(stream) if packet.size > 0)
