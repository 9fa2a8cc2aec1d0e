"""The lip-sync pipeline: resident models, one request at a time, phases timed.

A request runs as numbered steps (see `LipsyncPipeline.run`). Frames flow through in batches from
the decoder to the encoder, so memory does not grow with the video's length: per source frame we
keep only its face box and its 8x32x32 latent, and only while a later output frame still needs them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import torch

from musetalk_service.errors import BadAudio, Cancelled, NoFace
from musetalk_service.media.audio import load_audio
from musetalk_service.media.encode import EncoderChoice, VideoEncoder, choose_encoder
from musetalk_service.media.ffmpeg import find_ffmpeg
from musetalk_service.media.mux import mux_audio
from musetalk_service.media.probe import probe_audio, probe_video
from musetalk_service.nets.bundle import ModelBundle
from musetalk_service.pipeline.audio import AudioFeatures
from musetalk_service.pipeline.blend import FaceBlender
from musetalk_service.pipeline.faces import FaceLocator
from musetalk_service.pipeline.generate import generate_faces
from musetalk_service.pipeline.latents import encode_faces
from musetalk_service.pipeline.request import FaceBox, LipsyncRequest
from musetalk_service.pipeline.result import LipsyncResult
from musetalk_service.pipeline.source import SourceFrames
from musetalk_service.pipeline.stages import Consume, Prefetch
from musetalk_service.pipeline.timing import PhaseTimer
from musetalk_service.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

# An fps given as a float (29.97) becomes the exact broadcast rational it stands for (30000/1001).
_FPS_MAX_DENOMINATOR = 1001


class LipsyncPipeline:
    """Models loaded once; `run` turns one request into one MP4."""

    def __init__(self, models: ModelBundle, settings: Settings, encoder: EncoderChoice, ffmpeg: str):
        self.models = models
        self.settings = settings
        self.encoder = encoder
        self.ffmpeg = ffmpeg

    @classmethod
    def load(cls, settings: Settings) -> "LipsyncPipeline":
        """Find ffmpeg, probe the encoder, load every network onto the device and warm it up."""
        device = settings.resolved_device()
        # Weights first: a missing file is the commonest start failure and needs no ffmpeg to report.
        models = ModelBundle.load(settings.models_dir, device)
        ffmpeg = find_ffmpeg(settings.encode.ffmpeg_path)
        encoder = choose_encoder(settings.encode, ffmpeg)
        models.warmup()
        log.info("pipeline ready: device=%s weights=%s encoder=%s", device, models.weights_kind, encoder.name)
        return cls(models, settings, encoder, ffmpeg)

    def health(self) -> dict:
        return {
            "device": str(self.models.device),
            "weights": self.models.weights_kind,
            "encoder": self.encoder.name,
            "models_loaded": True,
        }

    def run(self, request: LipsyncRequest, progress: Progress | None = None, cancel: threading.Event | None = None) -> LipsyncResult:
        """Lip-sync `request.video_path` to `request.audio_path` and write `request.output_path`."""
        timer = PhaseTimer(sync=self._sync)
        work_dir = Path(tempfile.mkdtemp(prefix="musetalk-", dir=self.settings.work_dir))
        try:
            return self._run(request, timer, work_dir, progress or _no_progress, cancel)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    def _run(self, request: LipsyncRequest, timer: PhaseTimer, work_dir: Path, progress: Progress, cancel: threading.Event | None) -> LipsyncResult:
        # 1. Check inputs: probe both files before any model work.
        with timer.phase("read"):
            video = probe_video(request.video_path)
            probe_audio(request.audio_path)
        fps = Fraction(request.fps).limit_denominator(_FPS_MAX_DENOMINATOR) if request.fps else video.fps

        # 2. Audio: whisper features for the whole track; the output has floor(seconds * fps) frames.
        with timer.phase("audio", gpu=True):
            samples = load_audio(request.audio_path, self.ffmpeg)
            audio = AudioFeatures.from_samples(self.models, samples, fps)
        total = audio.frame_count
        if total == 0:
            raise BadAudio(f"{request.audio_path}: audio is shorter than one video frame ({len(samples) / 16000:.3f} s)")

        # 3. Per batch of output frames, three overlapping stages (pipeline/stages.py):
        #    read (decoder thread) -> faces, latents, UNet + decode (this thread, GPU) ->
        #    blend + encode (writer thread).
        source = SourceFrames(request.video_path, video, fps, self.ffmpeg, work_dir, total)
        locator = FaceLocator(self.models, request, self.settings.face, fps)
        blender = FaceBlender(self.models, request, retain=source.needs_cycle)
        silent_video = work_dir / "video.mp4"
        encoder = VideoEncoder(silent_video, video.width, video.height, fps, self.encoder, self.ffmpeg)
        counts = {"faces_seen": 0, "no_face_frames": 0}

        def read_batches():
            for start in range(0, total, request.batch_size):
                indices = list(range(start, min(start + request.batch_size, total)))
                with timer.phase("read"):
                    sources, frames = source.take(indices)
                yield indices, sources, frames

        def compose_and_encode(item) -> None:
            indices, sources, frames, rows, faces, boxes = item
            if rows:
                with timer.phase("blend"):
                    blender.blend_batch([frames[k] for k in rows], faces, [boxes[k] for k in rows], [sources[k] for k in rows])
            with timer.phase("encode"):
                encoder.write(frames)
            progress("frames", indices[-1] + 1, total)

        with encoder:
            reader = Prefetch("musetalk-read", read_batches())
            writer = Consume("musetalk-encode", compose_and_encode)
            try:
                self._generate(request, reader, writer, locator, audio, source.needs_cycle, timer, counts, cancel)
                if counts["faces_seen"] == 0:
                    tried = source.total if source.total is not None else source.decoded
                    raise NoFace(f"{request.video_path}: no face found in any of the {tried} frames tried")
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            finally:
                reader.close()
                source.close()
            with timer.phase("encode"):
                encoder.close()

        # 4. Mux: the video stream as encoded, the request's audio copied or encoded to AAC.
        with timer.phase("mux"):
            mux_audio(silent_video, request.audio_path, request.output_path, self.ffmpeg)
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
            frames_without_face=counts["no_face_frames"],
        )

    def _generate(self, request, reader, writer, locator, audio, needs_cycle, timer, counts, cancel) -> None:
        """The GPU stage: boxes and latents for new source frames, then UNet + VAE decode."""
        boxes: dict[int, FaceBox | None] = {}
        latents: dict[int, torch.Tensor] = {}
        for indices, sources, frames in reader:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the job was cancelled")
            new = sorted({j for j in sources if j not in boxes})
            if new:
                # Streaming batches are all new and in order: no copy needed.
                new_frames = frames if new == sources else frames[[sources.index(j) for j in new]]
                with timer.phase("face_detect", gpu=True):
                    found = locator.locate(new_frames, new)
                boxes.update(zip(new, found))
                with_face = [k for k, box in enumerate(found) if box is not None]
                counts["faces_seen"] += len(with_face)
                if with_face:
                    with timer.phase("vae_encode", gpu=True):
                        encoded = encode_faces(self.models, new_frames[with_face], [found[k] for k in with_face])
                    latents.update((new[k], encoded[n]) for n, k in enumerate(with_face))

            batch_boxes = [boxes[j] for j in sources]
            rows = [k for k, box in enumerate(batch_boxes) if box is not None]
            counts["no_face_frames"] += len(indices) - len(rows)
            faces = None
            if rows:
                with timer.phase("unet", gpu=True):
                    batch_latents = torch.stack([latents[sources[k]] for k in rows])
                    faces = generate_faces(self.models, batch_latents, audio.windows([indices[k] for k in rows]))
            writer.put((indices, sources, frames, rows, faces, batch_boxes))
            if not needs_cycle:
                # Streaming once through the video: these source frames are never needed again.
                for j in sources:
                    boxes.pop(j, None)
                    latents.pop(j, None)

    def _sync(self) -> None:
        if self.models.device.type == "cuda":
            torch.cuda.synchronize(self.models.device)


def _no_progress(phase: str, done: int, total: int) -> None:
    pass
