"""What the service will change about a lip-sync's media without being asked, said before it runs.

Each rule here mirrors the code that makes the change (named in each message's comment), and each
is decided from the probed inputs and the request alone, so the API can tell a client at check
time. The messages become the result's `warnings`.
"""

from __future__ import annotations

import math
from fractions import Fraction

from musetalk_service.media.encode import even_size
from musetalk_service.media.mux import MP4_COPY_AUDIO_CODECS
from musetalk_service.media.probe import AudioInfo
from musetalk_service.media.rates import exact_rate


def source_frames_at(duration_s: float, frame_count: int, source_fps: Fraction, fps: Fraction) -> int:
    """About how many frames a video gives at `fps`: its own count at its own rate, else what
    ffmpeg's `fps` filter (`media.decode`) makes of its duration (0.5 frame rounds up)."""
    if fps == source_fps:
        return frame_count
    return math.floor(duration_s * fps + Fraction(1, 2))


def output_warnings(
    *,
    width: int,
    height: int,
    source_fps: Fraction,
    source_frames: int,
    fps: Fraction,
    audio: AudioInfo,
    fps_given: float | None = None,
    still: bool = False,
) -> list[str]:
    """The changes a lip-sync of this video (`width` x `height`, `source_frames` at the output
    rate `fps`; `source_fps` its own rate) onto `audio` makes silently, one sentence each.
    `fps_given`: the request's fps when it came as a JSON number (it may have been snapped).
    `still`: the video is a picture, whose one frame is meant to be repeated at any rate."""
    warnings = []
    if (width, height) != even_size(width, height):  # media.encode.VideoEncoder crops
        out_w, out_h = even_size(width, height)
        warnings.append(
            f"frame size: the {width}x{height} video was cropped to {out_w}x{out_h} (H.264 4:2:0 needs even sides; "
            "the last column or row is dropped)"
        )
    if fps_given is not None and float(fps) != fps_given:  # media.rates.parse_fps snaps floats
        warnings.append(
            f"fps: {fps_given!r} was taken as {_rate(fps)}, the nearest rate with a denominator of at most 1001 "
            '(send an exact rate string such as "30000/1001" to choose it)'
        )
    if fps != source_fps and not still:  # media.decode's fps filter repeats or drops frames
        warnings.append(
            f"fps: the video's {_rate(source_fps)} fps was resampled to {_rate(fps)} fps (source frames repeated or dropped)"
        )
    if audio.codec not in MP4_COPY_AUDIO_CODECS:  # media.mux.Mp4Audio encodes it
        warnings.append(
            f"audio: the {audio.codec} track was encoded to AAC for the MP4 (MP4 players don't play {audio.codec})"
        )
    output_frames = math.floor(audio.duration_s * fps)
    if output_frames > source_frames and not still:  # pipeline.source.SourceFrames cycles
        warnings.append(
            f"video cycled: the audio ({output_frames} frames) is longer than the video ({source_frames} frames at "
            f"{_rate(fps)} fps), so the video plays forward, then backward, and again until the audio ends"
        )
    return warnings


def _rate(fps: Fraction) -> str:
    """`25`, `30000/1001 (29.97)`."""
    fps = exact_rate(fps)
    return str(fps.numerator) if fps.denominator == 1 else f"{fps.numerator}/{fps.denominator} ({float(fps):.4g})"
