"""The lip-sync pipeline: resident models, one request at a time, phases timed.

A request runs as numbered steps (see `LipsyncPipeline._run`): inputs, audio, the plan decided
once (pipeline/plan.py), the stages over it (pipeline/flow.py), the avatar cached, mux. Frames
flow through in batches from the decoder to the encoder, so memory does not grow with the
output's length: per source frame we keep only its face box, its 8x32x32 latent and (every
`mask_every` frames) a blend mask.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import torch

from musetalk_service import work_folders
from musetalk_service.errors import AvatarNotFound, BadAudio, GpuMemoryExhausted, InvalidOption
from musetalk_service.media.audio import load_audio
from musetalk_service.media.encode import EncoderChoice, VideoEncoder, choose_encoder
from musetalk_service.media.ffmpeg import find_ffmpeg
from musetalk_service.media.mux import Mp4Audio, mux_audio
from musetalk_service.media.segments import SegmentedEncoder
from musetalk_service.media.rates import output_rate
from musetalk_service.media.probe import VideoInfo, probe_audio, probe_video
from musetalk_service.nets.bundle import ModelBundle
from musetalk_service.nets.loading import release_freed_host_memory
from musetalk_service.nets.runtime import PREP_BATCH, load_models, release_cached_memory
from musetalk_service.nets.runtime import answers as device_answers
from musetalk_service.nets.runtime import memory_bytes as device_memory_bytes
from musetalk_service.pipeline.audio import AudioFeatures
from musetalk_service.pipeline.avatar_cache import Avatar, AvatarCache, avatar_key, prep_options, weights_fingerprint
from musetalk_service.contract import LipsyncRequest, LipsyncResult
from musetalk_service.pipeline.flow import PassContext, lipsync_pass, preparation_pass
from musetalk_service.pipeline.plan import RequestPlan, plan_preparation, plan_request
from musetalk_service.pipeline.timing import PhaseTimer
from musetalk_service.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]



class LipsyncPipeline:
    """Models loaded once; `run` turns one request into one MP4.

    A request has two halves. Preparing the video (face boxes, VAE latents, blend masks per source
    frame) depends only on the video and the preprocessing options, so it is an `Avatar`, kept in
    the avatar cache: the platform reuses a few template videos with many audios. Generating (UNet
    + VAE decode per output frame, blend, encode) depends on the audio and runs every time.
    """

    def __init__(self, models: ModelBundle, settings: Settings, encoder: EncoderChoice, ffmpeg: str):
        self.models = models
        self.settings = settings
        self.encoder = encoder
        self.ffmpeg = ffmpeg
        cache = settings.cache
        self.avatars: AvatarCache | None = (
            AvatarCache(cache.dir, max_memory_bytes=cache.max_memory_mb << 20, max_disk_bytes=cache.max_disk_mb << 20)
            if cache.enabled
            else None
        )
        self._weights_id = weights_fingerprint(settings.models_dir, str(models.dtype))

    @classmethod
    def load(cls, settings: Settings) -> "LipsyncPipeline":
        """Load every network onto the device, find ffmpeg, probe the encoder, warm up."""
        # Weights first: a missing file is the commonest start failure and needs no ffmpeg to report.
        models = load_models(settings, warm=False)
        ffmpeg = find_ffmpeg(settings.encode.ffmpeg_path)
        encoder = choose_encoder(settings.encode, ffmpeg)
        models.warmup()
        log.info("pipeline ready: device=%s weights=%s encoder=%s", models.device, models.weights_kind, encoder.name)
        return cls(models, settings, encoder, ffmpeg)

    def health(self) -> dict:
        return {
            "device": str(self.models.device),
            "weights": self.models.weights_kind,
            "encoder": self.encoder.name,
            "models_loaded": True,
        }

    def run(self, request: LipsyncRequest, progress: Progress | None = None, cancel: threading.Event | None = None) -> LipsyncResult:
        """Lip-sync the request's video (or prepared avatar) to its audio and write `output_path`."""
        timer = PhaseTimer(sync=self._sync)
        # Held while it lives: a server started after this process died removes it (work_folders.py).
        work_dir = work_folders.make(Path(self.settings.work_dir or tempfile.gettempdir()))
        try:
            with self._gpu_memory_named(), contextlib.ExitStack() as resources:
                return self._run(request, timer, work_dir, resources, progress or _no_progress, cancel)
        finally:
            work_folders.remove(work_dir)
            self._release_memory()

    @contextlib.contextmanager
    def _gpu_memory_named(self):
        """torch's out-of-memory error as the service's, naming the cap that was reached."""
        try:
            yield
        except torch.OutOfMemoryError as exc:
            limit = self.settings.gpu_memory_gb
            allowed = "the GPU has" if limit is None else f"gpu_memory_gb={limit:g} allows"
            raise GpuMemoryExhausted(f"the request needed more GPU memory than {allowed} ({str(exc).splitlines()[0]})") from exc

    def prepare_avatar(self, request: LipsyncRequest, cancel: threading.Event | None = None) -> Avatar:
        """Prepare the request's video ahead of time (or fetch it from the cache): its avatar."""
        video = probe_video(request.video_path)
        try:
            with self._gpu_memory_named():
                return self._avatar(request, video, self._fps(request, video), PhaseTimer(sync=self._sync), _no_progress, cancel)
        finally:
            self._release_memory()

    def list_avatars(self) -> list[dict]:
        return self.avatars.list() if self.avatars is not None else []

    def delete_avatar(self, avatar_id: str) -> bool:
        return self.avatars.delete(avatar_id) if self.avatars is not None else False

    def _run(self, request: LipsyncRequest, timer: PhaseTimer, work_dir: Path, resources: contextlib.ExitStack, progress: Progress, cancel: threading.Event | None) -> LipsyncResult:
        # 1. Check inputs: probe both files before any model work. The speech track for the MP4
        #    (AAC where its codec needs it) is made from here on, beside the video work.
        request = self._resolve_avatar(request)
        with timer.phase("read"):
            video = probe_video(request.video_path)
            speech = resources.enter_context(Mp4Audio(request.audio_path, probe_audio(request.audio_path), work_dir, self.ffmpeg))
        fps = self._fps(request, video)

        # 2. Audio: whisper features for the whole track; the output has floor(seconds * fps) frames.
        with timer.phase("audio", gpu=True):
            samples = load_audio(request.audio_path, self.ffmpeg)
            audio = AudioFeatures.from_samples(self.models, samples, fps)
        total = audio.frame_count
        if total == 0:
            raise BadAudio(f"{request.audio_path}: audio is shorter than one video frame ({len(samples) / 16000:.3f} s)")

        # 3. The video's avatar (boxes, latents, masks per source frame) from the cache, if there;
        #    then the plan: every decision of this request, made once (pipeline/plan.py).
        options, key = self._avatar_key(request, fps)
        avatar = self.avatars.get(key) if self.avatars is not None else None
        plan = plan_request(self.settings, str(self.models.device), request, video, fps, samples, total, prepared=avatar is not None)

        # 4. The stages over the plan's batches, overlapping in threads (pipeline/flow.py): read ->
        #    (a new video) faces -> (VAE encode) + UNet -> (masks) + compose + encode. A new video's
        #    avatar is prepared as it goes, then its frames past the audio's end.
        silent_video = work_dir / "video.mp4"
        with self._video_encoder(silent_video, video, plan, work_dir) as encoder:
            stages = lipsync_pass(self._context(timer), request, video, plan, audio, avatar, encoder, work_dir, progress)
            try:
                stages.run(cancel)
            finally:
                stages.close()
            with timer.phase("encode"):
                encoder.close()

        # 5. A new video's avatar, whole, into the cache.
        if stages.preparation is not None:
            avatar = stages.preparation.finish(key, options, video.width, video.height, request.video_path)
            if self.avatars is not None:
                self.avatars.put(avatar)

        # 6. Mux: the video stream as encoded, the speech track as `Mp4Audio` made it.
        with timer.phase("mux"):
            mux_audio(silent_video, speech.path(), request.output_path, self.ffmpeg)
        progress("done", total, total)
        return LipsyncResult(
            output_path=request.output_path,
            frames=total,
            fps=float(fps),
            duration_s=round(len(samples) / 16000, 4),
            encoder=self.encoder.name,
            weights=self.models.weights_kind,
            timings=timer.as_dict(),
            fallbacks=stages.blender.fallbacks,
            frames_without_face=stages.frames_without_face,
            frames_generated=stages.frames_generated,
            frames_silent=plan.silence.silent_frames,
            avatar_id=avatar.key if avatar is not None else None,
        )

    def _context(self, timer: PhaseTimer) -> PassContext:
        return PassContext(self.models, self.settings, self.ffmpeg, timer)

    def _video_encoder(self, path: Path, video: VideoInfo, plan: RequestPlan, work_dir: Path):
        """One ffmpeg, or `plan.encode_workers` on consecutive segments."""
        pix_fmt = plan.encode_pix_fmt
        if plan.encode_workers == 1:
            return VideoEncoder(path, video.width, video.height, plan.fps, self.encoder, self.ffmpeg, input_pix_fmt=pix_fmt)
        return SegmentedEncoder(
            path, video.width, video.height, plan.fps, self.encoder, self.ffmpeg,
            workers=plan.encode_workers, segment_frames=self.settings.encode.segment_frames, input_pix_fmt=pix_fmt, tmp_dir=work_dir,
        )  # fmt: skip

    def _fps(self, request: LipsyncRequest, video: VideoInfo) -> Fraction:
        return output_rate(request.fps, video.fps)

    def _resolve_avatar(self, request: LipsyncRequest) -> LipsyncRequest:
        """A request naming an avatar runs on that avatar's video with the options it was made with."""
        if request.avatar_id is None:
            if request.video_path is None:
                raise InvalidOption("give video_path or avatar_id")
            return request
        if request.video_path is not None:
            raise InvalidOption("give video_path or avatar_id, not both")
        avatar = self.avatars.get(request.avatar_id) if self.avatars is not None else None
        if avatar is None:
            raise AvatarNotFound(f"no prepared avatar {request.avatar_id!r}: POST /avatars prepares one")
        video_path = Path(avatar.video)
        if not video_path.is_file():
            raise AvatarNotFound(f"avatar {request.avatar_id!r}: its video {video_path.name} is gone; prepare it again")
        options = avatar.options
        return replace(
            request,
            video_path=video_path,
            fps=Fraction(options["fps"]),
            face_box=tuple(options["face_box"]) if options.get("face_box") else None,
            parsing_mode=options["parsing_mode"],
            mask_every=options["mask_every"],
            left_cheek_width=options.get("left_cheek_width", request.left_cheek_width),
            right_cheek_width=options.get("right_cheek_width", request.right_cheek_width),
            bbox_shift=options.get("bbox_shift", request.bbox_shift),
            extra_margin=options.get("extra_margin", request.extra_margin),
        )

    def _avatar_key(self, request: LipsyncRequest, fps: Fraction) -> tuple[dict, str]:
        options = prep_options(request, fps, self.settings.face, self._weights_id, batch_size=PREP_BATCH)
        return options, avatar_key(request.video_path, options)

    def _avatar(self, request: LipsyncRequest, video: VideoInfo, fps: Fraction, timer: PhaseTimer, progress: Progress, cancel: threading.Event | None) -> Avatar:
        options, key = self._avatar_key(request, fps)

        def build() -> Avatar:
            return self._build_avatar(key, options, request, video, fps, timer, progress, cancel)

        return build() if self.avatars is None else self.avatars.get_or_build(key, build, cancel)

    def _build_avatar(self, key: str, options: dict, request: LipsyncRequest, video: VideoInfo, fps: Fraction, timer: PhaseTimer, progress: Progress, cancel: threading.Event | None) -> Avatar:
        """Decode the whole video once through the preparation stream a request on a new video
        runs (pipeline/prepare.py): boxes (face phase), latents (VAE encode), masks (parse)."""
        plan = plan_preparation(self.settings, str(self.models.device), request, video, fps)
        stages = preparation_pass(self._context(timer), request, video, plan, progress)
        try:
            stages.run(cancel)
        finally:
            stages.close()
        return stages.preparation.finish(key, options, video.width, video.height, request.video_path)

    def _sync(self) -> None:
        """Wait for the work the calling thread queued (its current stream), for busy times.

        Not the whole device: each stage has its own stream (faces, composer), and a stage that
        waited for the others' work at each timing point would become the slowest of them."""
        if self.models.device.type == "cuda":
            torch.cuda.current_stream(self.models.device).synchronize()

    # For the service's probes and metrics (api/): cheap, no model work.

    def gpu_memory(self) -> dict[str, int] | None:
        """Bytes allocated and reserved by torch on the GPU; None on the CPU. Never blocks."""
        return device_memory_bytes(self.models.device)

    def _release_memory(self) -> None:
        """Give what a finished request freed back to the system: the GPU blocks torch cached
        (`release_cached_memory`) and the host heap glibc keeps. Without the latter, resident
        memory crept from 2.4 to 6.4 GB over 9 requests on the H100 (2026-11-24) while what was
        alive stayed the same; with it each request started at 2.8 GB."""
        release_cached_memory(self.models.device)
        release_freed_host_memory()

    def device_ok(self) -> bool:
        """A tiny op on the device, waited for (True on the CPU). Blocks if the GPU has stopped
        answering: call it from a thread with a timeout."""
        return device_answers(self.models.device)


def _no_progress(phase: str, done: int, total: int) -> None:
    pass
