"""The lip-sync pipeline: resident models, one request at a time, phases timed.

A request runs as numbered steps (see `LipsyncPipeline._run`). Frames flow through in batches from
the decoder to the encoder, so memory does not grow with the output's length: per source frame we
keep only its face box, its 8x32x32 latent and (every `mask_every` frames) a blend mask.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from musetalk_service.errors import AvatarNotFound, BadAudio, Cancelled, GpuMemoryExhausted, InvalidOption, NoFace
from musetalk_service.media.audio import load_audio
from musetalk_service.media.decode import VideoReader
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
from musetalk_service.pipeline.blend import FaceBlender
from musetalk_service.pipeline.compose import GpuComposer
from musetalk_service.pipeline.frames import DeviceFrames, DeviceFrameUploader
from musetalk_service.pipeline.generate import generate_faces, generate_faces_tensor
from musetalk_service.pipeline.prepare import AvatarBuilder
from musetalk_service.contract import FaceBox, LipsyncRequest, LipsyncResult
from musetalk_service.pipeline.plan import RequestPlan, plan_preparation, plan_request
from musetalk_service.pipeline.source import SourceFrames
from musetalk_service.pipeline.stages import Consume, Prefetch
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
        work_dir = Path(tempfile.mkdtemp(prefix="musetalk-", dir=self.settings.work_dir))
        try:
            with self._gpu_memory_named(), contextlib.ExitStack() as resources:
                return self._run(request, timer, work_dir, resources, progress or _no_progress, cancel)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
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

        # 3. The video's avatar (boxes, latents, masks per source frame): from the cache, else
        #    built in this pass, each batch prepared just before it is generated. Then the plan:
        #    every decision of this request, made once (pipeline/plan.py).
        options, key = self._avatar_key(request, fps)
        avatar = self.avatars.get(key) if self.avatars is not None else None
        plan = plan_request(self.settings, str(self.models.device), request, video, fps, samples, total, prepared=avatar is not None)
        silence = plan.silence
        builder = AvatarBuilder(self.models, request, self.settings.face, fps) if plan.prepares else None

        # 4. Per batch of output frames, overlapping stages (pipeline/stages.py): read in the
        #    decoder thread -> (new video) face phase in the face thread -> crops + VAE encode,
        #    UNet + VAE decode in this thread (GPU) -> blend + encode in the writer thread.
        batch_size = plan.batch_size
        yuv_frames = plan.decode_pix_fmt == "yuv420p"
        upload = DeviceFrameUploader(self.models.device, video.width, video.height) if plan.uploads_frames else None
        source = SourceFrames(
            request.video_path, video, fps, self.ffmpeg, work_dir, total, avatar.frame_count if avatar else None,
            pix_fmt=plan.decode_pix_fmt,
        )  # fmt: skip
        blender = FaceBlender(
            self.models, request, retain=source.needs_cycle or builder is not None, masks=avatar.masks if avatar else None
        )
        composer = GpuComposer(blender, self.models.device) if plan.on_device else None
        generate = generate_faces_tensor if composer is not None else generate_faces
        cached_latents = avatar.latents.to(self.models.device, self.models.dtype) if avatar else None
        boxes = avatar.boxes if avatar else builder.boxes if builder else None
        silent_video = work_dir / "video.mp4"
        encoder = self._video_encoder(silent_video, video, plan, work_dir)

        def read_batches():
            for start in range(0, total, batch_size):
                indices = list(range(start, min(start + batch_size, total)))
                with timer.phase("read"):
                    sources, frames, fresh = source.take(indices)
                    # What the face phase and the masks read: BGR frames as decoded, or a new
                    # video's yuv420p made BGR on the device; a prepared avatar's yuv420p needs none.
                    if not yuv_frames:
                        bgr = frames
                    else:
                        bgr = upload(frames) if upload is not None else None
                yield indices, sources, frames, bgr, fresh

        def locate_batches(batches):
            for indices, sources, frames, bgr, fresh in batches:
                located = None
                if fresh:
                    with timer.phase("face_detect"):
                        located = builder.locate(bgr[:fresh])
                yield indices, sources, frames, bgr, located

        def compose_and_encode(item) -> None:
            indices, sources, frames, bgr, rows, faces, ready, weights = item
            # The frames generated keep their boxes; the others (no face, or silent) have none.
            made = set(rows)
            generated = [boxes[j] if k in made else None for k, j in enumerate(sources)]
            if builder is not None:
                self._prepare_silent_masks(blender, bgr, [boxes[j] for j in sources], generated, sources, timer)
            if yuv_frames:
                with timer.phase("blend"):
                    out = composer.compose_yuv(
                        frames, video.width, video.height, faces, generated, sources,
                        ready=ready, frame_at=None if bgr is None else bgr.__getitem__, weights=weights,
                    )  # fmt: skip
            elif composer is not None:
                with timer.phase("blend"):
                    out = composer.compose(frames, faces, generated, sources, ready=ready, weights=weights).yuv
            else:
                out = frames
                if rows:
                    with timer.phase("blend"):
                        blender.blend_batch(
                            [frames[k] for k in rows], faces, [generated[k] for k in rows], [sources[k] for k in rows],
                            weights=[weights[k] for k in rows],
                        )  # fmt: skip
            with timer.phase("encode"):
                encoder.write(out)
            progress("frames", indices[-1] + 1, total)

        no_face_frames = generated_frames = 0
        try:
            with encoder:
                depth = plan.queue_depth
                reader = Prefetch("musetalk-read", read_batches(), depth=depth)
                # The face phase in a thread of its own: in the decoder's, decoding and finding
                # faces took turns (80 fps on a new 1080p video on the H100).
                faces_stage = Prefetch("musetalk-faces", locate_batches(reader), depth=depth) if builder is not None else None
                batches = faces_stage if faces_stage is not None else ((i, s, f, b, None) for i, s, f, b, _ in reader)
                writer = Consume("musetalk-encode", compose_and_encode, depth=depth)
                try:
                    for indices, sources, frames, bgr, located in batches:
                        _check_cancel(cancel)
                        if located is not None:
                            with timer.phase("vae_encode", gpu=True):
                                builder.encode(located)
                        if builder is not None and source.frame_count is not None and not builder.has_face:
                            raise NoFace(f"{request.video_path}: no face found in any of the {builder.located} frames tried")
                        weights = silence.weights[indices]
                        speaking = [k for k in range(len(indices)) if weights[k] > 0]  # the others pass through as silent
                        rows = [k for k in speaking if boxes[sources[k]] is not None]
                        no_face_frames += len(speaking) - len(rows)
                        generated_frames += len(rows)
                        faces = ready = None
                        if rows:
                            with timer.phase("unet", gpu=composer is None):
                                picked = [sources[k] for k in rows]
                                latents = cached_latents[picked] if builder is None else builder.latents(picked)
                                faces = generate(self.models, latents, audio.windows([indices[k] for k in rows]))
                                if composer is not None and composer.device.type == "cuda":
                                    # The composer's stream waits for this event, not for the whole
                                    # device; waiting on it here keeps the UNet's busy time honest.
                                    ready = torch.cuda.Event()
                                    ready.record()
                                    ready.synchronize()
                        writer.put((indices, sources, frames, bgr, rows, faces, ready, weights))
                    writer.finish()
                except BaseException:
                    writer.abort()
                    raise
                finally:
                    if faces_stage is not None:
                        faces_stage.close()
                    reader.close()
                with timer.phase("encode"):
                    encoder.close()
            # A video longer than the audio: prepare its other frames too, so the avatar is whole.
            if builder is not None:
                avatar = self._finish_avatar(builder, source, upload, blender, request, video, key, options, timer, cancel)
        finally:
            source.close()
        if builder is not None and self.avatars is not None:
            self.avatars.put(avatar)

        # 5. Mux: the video stream as encoded, the speech track as `Mp4Audio` made it.
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
            fallbacks=blender.fallbacks,
            frames_without_face=no_face_frames,
            frames_generated=generated_frames,
            frames_silent=silence.silent_frames,
            avatar_id=avatar.key if avatar is not None else None,
        )

    def _prepare_silent_masks(
        self, blender: FaceBlender, bgr: np.ndarray | DeviceFrames, boxes: list[FaceBox | None], generated: list[FaceBox | None],
        sources: list[int], timer: PhaseTimer,
    ) -> None:  # fmt: skip
        """A new video's masks of the frames with a face that are not generated (silent), so its
        avatar is whole: a later request on it may generate them."""
        silent = [k for k, (box, made) in enumerate(zip(boxes, generated)) if box is not None and made is None]
        if silent:
            with timer.phase("blend"):
                blender.prepare_masks([bgr[k] for k in silent], [boxes[k] for k in silent], [sources[k] for k in silent])

    def _finish_avatar(self, builder: AvatarBuilder, source: SourceFrames, upload: DeviceFrameUploader | None, blender: FaceBlender, request: LipsyncRequest, video: VideoInfo, key: str, options: dict, timer: PhaseTimer, cancel: threading.Event | None) -> Avatar:
        """Prepare the frames the output did not reach (the audio was shorter), then the avatar."""
        for frames in source.remaining(PREP_BATCH):
            _check_cancel(cancel)
            self._prepare_batch(builder, blender, upload(frames) if upload is not None else frames, timer)
        return builder.finish(key, options, video.width, video.height, request.video_path, blender.export_masks())

    def _prepare_batch(self, builder: AvatarBuilder, blender: FaceBlender, frames: np.ndarray | DeviceFrames, timer: PhaseTimer) -> None:
        """Boxes, latents and masks of the next source frames, when nothing is generated from them."""
        with timer.phase("face_detect", gpu=True):
            located = builder.locate(frames)
        with timer.phase("vae_encode", gpu=True):
            builder.encode(located)
        if located.rows:
            with timer.phase("blend", gpu=True):
                rows = located.rows
                blender.prepare_masks([frames[k] for k in rows], [located.boxes[k] for k in rows], [located.first + k for k in rows])

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
        """Decode the whole video once: boxes (face phase), latents (VAE encode), masks (BiSeNet)."""
        builder = AvatarBuilder(self.models, request, self.settings.face, fps)
        blender = FaceBlender(self.models, request, retain=True)
        estimate = max(video.frame_count, 1)
        # As in a request on a new video, so both prepare the same avatar.
        plan = plan_preparation(self.settings, str(self.models.device), request, video, fps)
        upload = DeviceFrameUploader(self.models.device, video.width, video.height) if plan.uploads_frames else None

        def read_batches():
            with VideoReader(request.video_path, video, fps, self.ffmpeg, plan.decode_pix_fmt) as reader:
                while True:
                    with timer.phase("read"):
                        frames = reader.read(PREP_BATCH)
                        if len(frames) and upload is not None:
                            frames = upload(frames)
                    if not len(frames):
                        return
                    yield frames

        reader = Prefetch("musetalk-prepare", read_batches())
        try:
            for frames in reader:
                _check_cancel(cancel)
                self._prepare_batch(builder, blender, frames, timer)
                progress("prepare", builder.located, max(estimate, builder.located))
        finally:
            reader.close()
        return builder.finish(key, options, video.width, video.height, request.video_path, blender.export_masks())

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


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the job was cancelled")
