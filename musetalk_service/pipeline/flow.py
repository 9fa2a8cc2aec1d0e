"""One pass over a video: the stage objects of a request (or of an avatar prepared ahead of
time) and the threads that overlap them (pipeline/stages.py), batch by batch:

    decoder thread       face thread          this thread (GPU)               writer thread
    source.ReadStage ->  faces.FaceStage  ->  latents.LatentStage (VAE)   ->  parse.ParseStage
                         (a new video)        generate.GenerateStage (UNet)   compose.ComposeStage (+ encode)

Each stage fills in its part of the `batch.Batch` record and hands it on. The plan
(`plan.RequestPlan`) decided beforehand which stages a pass has: a prepared avatar has no face,
VAE or parse phase; an avatar prepared ahead has no UNet and no compose; a new video's request
has them all, and after the output's batches prepares the frames the output did not reach.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musetalk_service.contract import LipsyncRequest
from musetalk_service.errors import Cancelled
from musetalk_service.media.probe import VideoInfo
from musetalk_service.pipeline.audio import AudioFeatures
from musetalk_service.pipeline.avatar_cache import Avatar
from musetalk_service.pipeline.batch import Batch
from musetalk_service.pipeline.blend import FaceBlender
from musetalk_service.pipeline.compose import ComposeStage, Encoder, make_compositor
from musetalk_service.pipeline.faces import FaceStage
from musetalk_service.pipeline.frames import DeviceFrameUploader
from musetalk_service.pipeline.generate import GenerateStage
from musetalk_service.pipeline.plan import RequestPlan
from musetalk_service.pipeline.prepare import AvatarPreparation
from musetalk_service.pipeline.source import ReadStage, SourceFrames
from musetalk_service.pipeline.stages import Consume, Prefetch
from musetalk_service.pipeline.timing import PhaseTimer
from musetalk_service.settings import Settings

Progress = Callable[[str, int, int], None]
Step = Callable[[Batch], object]


@dataclass(frozen=True)
class PassContext:
    """What every pass reads: the loaded models, the settings, ffmpeg, the request's timer."""

    models: Any
    settings: Settings
    ffmpeg: str
    timer: PhaseTimer


@dataclass
class Pass:
    """The stages of one pass (see the module docstring); `run` drives them, `close` ends the decoder."""

    plan: RequestPlan
    source: SourceFrames
    read: ReadStage
    faces: FaceStage | None
    """The face phase, in a thread of its own: in the decoder's, decoding and finding faces took
    turns (80 fps on a new 1080p video on the H100)."""
    gpu: list[Step]
    """In the caller's thread, in order."""
    writer: list[Step]
    """In the writer thread, in order."""
    blender: FaceBlender
    """The masks the compositor reads (and its count of fallbacks)."""
    preparation: AvatarPreparation | None = None
    generate: GenerateStage | None = None
    """The UNet phase (a request with frames to generate): its counts go in the result."""

    def run(self, cancel: Any = None) -> None:
        """Every batch through every stage; raises the first stage's failure, `Cancelled` between batches."""
        depth = self.plan.queue_depth
        reader = Prefetch("musetalk-read", self.read.batches(), depth=depth)
        faces = Prefetch("musetalk-faces", map(self.faces.run, reader), depth=depth) if self.faces is not None else None
        writer = Consume("musetalk-encode", self._write, depth=depth)
        try:
            for batch in faces if faces is not None else reader:
                check_cancel(cancel)
                for step in self.gpu:
                    step(batch)
                writer.put(batch)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            if faces is not None:
                faces.close()
            reader.close()

    def _write(self, batch: Batch) -> None:
        for step in self.writer:
            step(batch)

    def close(self) -> None:
        self.source.close()

    @property
    def frames_generated(self) -> int:
        return self.generate.generated_frames if self.generate is not None else 0

    @property
    def frames_without_face(self) -> int:
        """Speaking frames whose source frame has no face (they pass through as they are)."""
        return self.generate.frames_without_face if self.generate is not None else 0


def lipsync_pass(
    context: PassContext, request: LipsyncRequest, video: VideoInfo, plan: RequestPlan, audio: AudioFeatures,
    avatar: Avatar | None, encoder: Encoder, work_dir: Path, progress: Progress,
) -> Pass:  # fmt: skip
    """A request's pass: on `avatar` (prepared), else preparing the video's avatar as it goes."""
    models, timer = context.models, context.timer
    source = SourceFrames(
        request.video_path, video, plan.fps, context.ffmpeg, work_dir, plan.frames, avatar.frame_count if avatar else None,
        pix_fmt=plan.decode_pix_fmt,
    )  # fmt: skip
    try:
        blender = FaceBlender(
            models, request, retain=source.needs_cycle or plan.prepares, masks=avatar.masks if avatar else None,
            parses_on_demand=False,
        )  # fmt: skip
        compositor = make_compositor(plan.compositing, blender, models.device, video.width, video.height)
        preparation = _preparation(context, request, video, plan, source, blender, compositor.on_stream) if plan.prepares else None
        generate = None
        if avatar is not None:
            boxes = avatar.boxes
            generate = GenerateStage(models, audio, boxes, avatar.latents.to(models.device, models.dtype).__getitem__, on_device=plan.on_device, timer=timer)
        elif preparation is not None:
            boxes = preparation.boxes
            generate = GenerateStage(models, audio, boxes, preparation.latents.latents, on_device=plan.on_device, timer=timer)
        else:
            boxes = ()  # a track silent throughout: nothing is generated, every frame passes through
        compose = ComposeStage(compositor, boxes, encoder, timer, progress, plan.frames)
    except BaseException:
        source.close()
        raise
    read = ReadStage(plan, source, _uploader(models, video, plan), timer)
    gpu: list[Step] = [] if generate is None else [generate.run]
    if preparation is None:
        return Pass(plan, source, read, None, gpu, [compose.run], blender, generate=generate)
    return Pass(
        plan, source, read, preparation.faces, [preparation.encode, *gpu], [preparation.masks.run, compose.run], blender,
        preparation=preparation, generate=generate,
    )  # fmt: skip


def preparation_pass(context: PassContext, request: LipsyncRequest, video: VideoInfo, plan: RequestPlan, progress: Progress) -> Pass:
    """An avatar prepared ahead of time: every frame of the video through the preparation stream."""
    source = SourceFrames(request.video_path, video, plan.fps, context.ffmpeg, None, 0, None, pix_fmt=plan.decode_pix_fmt)
    try:
        blender = FaceBlender(context.models, request, retain=True, parses_on_demand=False)
        # No output: the compositor a request would have serves only as the parse phase's stream.
        compositor = make_compositor(plan.compositing, blender, context.models.device, video.width, video.height)
        preparation = _preparation(context, request, video, plan, source, blender, compositor.on_stream)
    except BaseException:
        source.close()
        raise
    read = ReadStage(plan, source, _uploader(context.models, video, plan), context.timer)
    reported = PreparedProgress(progress, video.frame_count)
    return Pass(
        plan, source, read, preparation.faces, [preparation.encode], [preparation.masks.run, reported.run], blender,
        preparation=preparation,
    )  # fmt: skip


def _preparation(
    context: PassContext, request: LipsyncRequest, video: VideoInfo, plan: RequestPlan, source: SourceFrames,
    blender: FaceBlender, on_stream: Callable[[], Any],
) -> AvatarPreparation:  # fmt: skip
    return AvatarPreparation(
        context.models, request, context.settings.face, plan.fps, plan.prep_batch, blender, on_stream, source, context.timer
    )


def _uploader(models: Any, video: VideoInfo, plan: RequestPlan) -> DeviceFrameUploader | None:
    return DeviceFrameUploader(models.device, video.width, video.height) if plan.uploads_frames else None


class PreparedProgress:
    """The writer's last step when an avatar is prepared ahead: progress after each batch."""

    def __init__(self, progress: Progress, estimate: int):
        self.progress = progress
        self.estimate = max(estimate, 1)

    def run(self, batch: Batch) -> None:
        if batch.located is not None:
            done = batch.located.first + len(batch.located.boxes)
            self.progress("prepare", done, max(self.estimate, done))


def check_cancel(cancel: Any) -> None:
    """Raise Cancelled if `cancel` (a `threading.Event`, or None) is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("the job was cancelled")

