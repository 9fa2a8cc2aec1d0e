"""The request plan: every per-request decision, made once before a frame moves.

The stages read the plan and never decide again: the output rate and frame count, how the video
is decoded (its own yuv420p planes, or BGR), which compositor pastes the faces (numpy, device BGR,
device yuv420p), the batch sizes, the encoder count, which frames are generated (the silence
plan) and whether the avatar is prepared already, prepared in this pass, or not needed at all.
A change of policy (a new pixel path, another compositor, a batch rule) goes here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np

from musetalk_service.contract import LipsyncRequest
from musetalk_service.media.probe import VideoInfo
from musetalk_service.media.segments import encode_workers_for
from musetalk_service.nets.runtime import PREP_BATCH
from musetalk_service.pipeline.silence import SilencePlan, SilenceRule
from musetalk_service.settings import Settings

AvatarState = Literal["prepared", "new", "unneeded"]
"""`prepared`: from the cache; `new`: prepared in this pass, each batch just before it is
generated; `unneeded`: nothing is generated (a track silent throughout), so no face is looked for."""

Compositing = Literal["numpy", "device_bgr", "device_yuv"]
"""`numpy`: the CPU blend of BGR frames; `device_bgr`: BGR frames composed on the model device,
yuv420p out; `device_yuv`: the decoder's own yuv420p planes, only the tiles under the masks blended."""

PixelFormat = Literal["yuv420p", "bgr24"]


@dataclass(frozen=True)
class RequestPlan:
    """What one request (or one avatar preparation: `frames == 0`) does, decided once."""

    fps: Fraction
    """The output rate, exact (`media.rates.output_rate`); also the rate the source is decoded at."""
    frames: int
    """Output frames: floor(audio seconds * fps); 0 when only an avatar is prepared."""
    avatar: AvatarState
    decode_pix_fmt: PixelFormat
    """The decoder's output: the video's own yuv420p planes where they pass through to the
    encoder (`compositing == "device_yuv"`), else BGR."""
    compositing: Compositing
    batch_size: int
    """Output frames per batch (a new video's face phase runs over whole `prep_batch` runs)."""
    prep_batch: int
    """Source frames per face-tracking run; batches past the output's end have this many."""
    aligns_prep: bool
    """Whether a new video is decoded ahead to the next `prep_batch` boundary when the output ends
    before it: tracking places keyframes per run, so the boxes are then those of a preparation
    ahead of time. Only where boxes are tracked (no `face_box`)."""
    queue_depth: int
    """Batches queued between two stages: 1 when the face phase is one of them (a batch of 1080p
    frames is 200 MB, and each slot is host memory held), else 2."""
    encode_workers: int
    silence: SilencePlan

    @property
    def prepares(self) -> bool:
        """Whether this pass prepares the video's avatar."""
        return self.avatar == "new"

    @property
    def uploads_frames(self) -> bool:
        """Whether each batch of yuv420p frames is made BGR on the device (`frames.DeviceFrames`)
        for the face and parse phases: a new video decoded as its planes."""
        return self.prepares and self.decode_pix_fmt == "yuv420p"

    @property
    def on_device(self) -> bool:
        return self.compositing != "numpy"

    @property
    def encode_pix_fmt(self) -> PixelFormat:
        """What the compositor hands the encoder: yuv420p from the device, BGR from numpy."""
        return "yuv420p" if self.on_device else "bgr24"


def plan_request(
    settings: Settings, device: str, request: LipsyncRequest, video: VideoInfo, fps: Fraction, samples: np.ndarray,
    frames: int, *, prepared: bool,
) -> RequestPlan:  # fmt: skip
    """The plan of a lip-sync of `frames` output frames over `samples` (16 kHz); `prepared`:
    whether the video's avatar came from the cache."""
    silence = _silence_plan(settings, request, samples, fps, frames)
    avatar: AvatarState = "prepared" if prepared else "new" if silence.generates else "unneeded"
    return _plan(settings, device, request, video, fps, frames, avatar, silence)


def plan_preparation(settings: Settings, device: str, request: LipsyncRequest, video: VideoInfo, fps: Fraction) -> RequestPlan:
    """The plan of preparing the video's avatar ahead of time: no output, every frame prepared."""
    return _plan(settings, device, request, video, fps, 0, "new", SilencePlan.generate_all(0))


def _plan(
    settings: Settings, device: str, request: LipsyncRequest, video: VideoInfo, fps: Fraction, frames: int,
    avatar: AvatarState, silence: SilencePlan,
) -> RequestPlan:  # fmt: skip
    new_video = avatar != "prepared"
    detects = request.face_box is None
    # On a GPU, compose there and hand ffmpeg yuv420p (half the bytes, no conversion in ffmpeg);
    # on CPU the numpy blend is faster than torch's CPU kernels (settings.compose). When the
    # video is BT.709 yuv420p, decode to the planes as they are (half the bytes of BGR through
    # the decoder's pipe, no conversion there) and blend only the tiles under the masks. A new
    # video's face phase then reads them made BGR on the device; not with the Haar detector,
    # which reads whole frames on the CPU.
    on_device = settings.composes_on_device(device)
    passes_planes = on_device and video.is_bt709_yuv420p and (not new_video or not detects or settings.face.detector != "haar")
    compositing: Compositing = "device_yuv" if passes_planes else "device_bgr" if on_device else "numpy"
    batch_size = PREP_BATCH if frames == 0 else request.batch_size
    if avatar == "new" and detects:
        # Whole tracking runs per batch: the boxes come out as a separate preparation's would.
        batch_size = -(-batch_size // PREP_BATCH) * PREP_BATCH
    return RequestPlan(
        fps=fps,
        frames=frames,
        avatar=avatar,
        decode_pix_fmt="yuv420p" if passes_planes else "bgr24",
        compositing=compositing,
        batch_size=batch_size,
        prep_batch=PREP_BATCH,
        aligns_prep=avatar == "new" and detects,
        queue_depth=1 if avatar == "new" else 2,
        encode_workers=_encode_workers(settings, video, "yuv420p" if on_device else "bgr24"),
        silence=silence,
    )


def _silence_plan(settings: Settings, request: LipsyncRequest, samples: np.ndarray, fps: Fraction, frames: int) -> SilencePlan:
    """The output's frames by weight: all generated, or (`silence: source`) silence passed through."""
    if request.silence == "generate":
        return SilencePlan.generate_all(frames)
    config = settings.silence
    rule = SilenceRule(config.threshold_db, config.hysteresis_db, config.floor_dbfs, config.min_silence_s)
    return SilencePlan.from_samples(samples, 16000, fps, frames, rule, config.fade_frames)


def _encode_workers(settings: Settings, video: VideoInfo, pix_fmt: str) -> int:
    """One ffmpeg, or several on consecutive segments where one libx264 can't keep up."""
    workers = settings.encode.workers
    if workers == "auto":
        return encode_workers_for(video.width, video.height, os.cpu_count(), pix_fmt)
    return int(workers)
