"""The `musetalk-service` command: serve, run, weights random|download|check, demo.

Heavy modules (torch, the networks, uvicorn) are imported inside the command that needs them, so
`--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import typing
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import pydantic

from musetalk_service.benchmark import EXTRA_RUNS, RUNS
from musetalk_service.errors import ServiceError, WeightsError
from musetalk_service.media.rates import parse_fps
from musetalk_service.settings import LipsyncDefaults, Settings, load_settings

if TYPE_CHECKING:
    from musetalk_service.nets.layout import FaceDetector
    from musetalk_service.contract import LipsyncRequest
    from musetalk_service.pipeline.runner import LipsyncPipeline

# Exit codes: 1 a failed command (bad input, failed lip-sync, unusable weights folder); 2 the
# service can't start (bad settings, missing weights), as argparse uses 2 for a bad command line.
EXIT_FAILED = 1
EXIT_CANNOT_START = 2

_REQUEST_GRACE_S = 10
"""Seconds uvicorn gives requests still in flight after a drain before it closes them."""

# The demo clip: the astronaut photo scikit-image ships, as a talking head.
DEMO_FPS = 25
DEMO_SIZE = (512, 512)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.command(args)


# --- serve -------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args, host=args.host, port=args.port)
    if settings is None:
        return EXIT_CANNOT_START
    if args.ray:
        if args.replicas is not None:
            if args.replicas < 1:
                _error(f"--replicas must be at least 1, got {args.replicas}")
                return EXIT_CANNOT_START
            settings = settings.model_copy(update={"ray": settings.ray.model_copy(update={"engine_replicas": args.replicas})})
        return _serve_ray(settings)
    import uvicorn

    from musetalk_service.api.app import ServiceServer, create_app
    from musetalk_service.nets.bundle import _require_files

    # Missing weights are the commonest start failure: said before the socket opens. The models
    # then load in the background, so /health answers at once and /ready turns 200 when loaded;
    # a load failure (a malformed file) stops the server with the same exit code.
    try:
        _require_files(settings.models_dir, settings.face.detector)
    except WeightsError as e:
        _error(f"cannot start: {e.message}")
        return EXIT_CANNOT_START
    failed: list[str] = []
    server: ServiceServer | None = None

    def load_failed(message: str) -> None:
        failed.append(message)
        _error(f"cannot start: {message}")
        if server is not None:
            server.should_exit = True

    try:
        app = create_app(settings, on_load_failure=load_failed)
    except ValueError as e:
        _error(f"bad settings: {e}")
        return EXIT_CANNOT_START
    # log_config=None: uvicorn's loggers go through the logging set up in `_settings`. uvicorn's
    # shutdown starts once the drain is over (no job runs): requests still in flight then (a
    # download, a waiting POST /lipsync being answered) get a few seconds to finish.
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=_REQUEST_GRACE_S,
    )
    server = ServiceServer(config)
    server.run()
    return EXIT_CANNOT_START if failed or not server.started else 0


def _serve_ray(settings: Settings) -> int:
    """The Ray Serve application (serve_ray/app.py): joins the cluster at RAY_ADDRESS, else starts
    one on this machine; serves until SIGTERM/SIGINT, then removes the application (the ingress
    drains its job queue as `serve` does) and leaves the cluster."""
    try:
        import ray
        from ray import serve

        from musetalk_service.serve_ray.app import build
    except ImportError as e:
        _error(f"--ray needs Ray Serve ({e.name} is missing): pip install 'musetalk-service[ray]'")
        return EXIT_CANNOT_START
    import signal
    import threading

    from musetalk_service.nets.bundle import _require_files

    joining = bool(os.environ.get("RAY_ADDRESS"))
    if not joining:
        # On one machine the replicas read this models folder: say what is missing before starting.
        try:
            _require_files(settings.models_dir, settings.face.detector)
        except WeightsError as e:
            _error(f"cannot start: {e.message}")
            return EXIT_CANNOT_START
    ray.init()  # RAY_ADDRESS, else a cluster started here with `ray start`, else a new local one
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build(settings), name=settings.ray.app_name, route_prefix="/", blocking=False)
        print(f"serving on http://{settings.host}:{settings.port} (Ray Serve application {settings.ray.app_name!r})", flush=True)
        stop.wait()
        serve.delete(settings.ray.app_name)
    finally:
        ray.shutdown()
    return 0


# --- run ---------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_CANNOT_START
    from musetalk_service.api.errors import describe_validation_errors
    from musetalk_service.api.requests import check_face_box, prepare_request
    from musetalk_service.api.schemas import LipsyncBody
    from musetalk_service.media.probe import probe_video
    from musetalk_service.pipeline.runner import LipsyncPipeline

    fields = {name: getattr(args, name) for name in LipsyncDefaults.model_fields}
    try:
        body = LipsyncBody(
            video_path=args.video, audio_path=args.audio, output_path=args.output,
            face_box=args.face_box, fps=args.fps, **fields,
        )
        request = prepare_request(body, settings)
        if request.face_box is not None:  # checked before the models load
            check_face_box(request, probe_video(request.video_path))
        pipeline = LipsyncPipeline.load(settings)
        _lipsync(pipeline, request)
    except pydantic.ValidationError as e:
        _error(f"invalid option: {describe_validation_errors(e.errors())}")
        return EXIT_FAILED
    except ServiceError as e:
        _error(f"[{e.code}] {e.message}")
        return EXIT_FAILED
    return 0


def _lipsync(pipeline: LipsyncPipeline, request: LipsyncRequest) -> None:
    """Run one request with a progress bar, then print where the output went and the timings."""
    from tqdm import tqdm

    with tqdm(unit="frame", desc="lip-sync", dynamic_ncols=True) as bar:

        def progress(phase: str, done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = pipeline.run(request, progress=progress)
    print(f"\nwrote {result.output_path}")
    print(
        f"{result.frames} frames at {result.fps:g} fps, {result.duration_s:.2f} s; encoder {result.encoder}; "
        f"weights {result.weights}; frames without a face {result.frames_without_face}; "
        f"blend fallbacks {result.fallbacks}"
    )
    print(_timings_table(result.timings))
    if result.weights == "random":
        _random_weights_warning()


def _timings_table(timings: dict[str, float]) -> str:
    total = timings["total"]
    rows = [f"{'phase':<12}{'seconds':>10}{'share':>8}"]
    rows += [
        f"{phase:<12}{seconds:>10.3f}{seconds / total if total else 0:>8.1%}"
        for phase, seconds in timings.items()
        if phase != "total"
    ]
    rows.append(f"{'total':<12}{total:>10.3f}")
    return "\n".join(rows)


# --- weights -----------------------------------------------------------------------------------


def _weights_random(args: argparse.Namespace) -> int:
    _configure_logging("INFO")
    from musetalk_service.nets.random_weights import write_random_weights

    folder = write_random_weights(args.dir, args.size)
    print(f"wrote {args.size} random weights to {folder}")
    _random_weights_warning()
    return 0


def _weights_download(args: argparse.Namespace) -> int:
    _configure_logging("INFO")
    detector = _configured_detector(args)
    if detector is None:
        return EXIT_CANNOT_START
    from musetalk_service.nets.download import download_weights
    from musetalk_service.nets.layout import WEIGHT_FILES, needed_files

    files = needed_files(detector)
    # With haar, S3FD and FAN are skipped: they are never loaded, and they are the files a machine
    # without access to their hosts cannot fetch.
    skipped = [f.relpath for f in WEIGHT_FILES if f not in files]
    if skipped:
        print(f"face.detector is {detector}: not downloading {', '.join(skipped)} (only face.detector: s3fd loads them)")
    try:
        download_weights(args.dir, files)
    # huggingface_hub's and urllib's network errors are all OSErrors.
    except (ServiceError, OSError) as e:
        _error(f"download failed: {e}")
        return EXIT_FAILED
    print(f"downloaded the official weights to {args.dir}")
    return 0


def _weights_check(args: argparse.Namespace) -> int:
    _configure_logging("WARNING")
    detector = _configured_detector(args)
    if detector is None:
        return EXIT_CANNOT_START
    from musetalk_service.nets.check import check_weights
    from musetalk_service.nets.layout import DOWNLOAD_COMMAND

    report = check_weights(args.dir, detector)
    print(report.summary())
    if report.ok:
        return 0
    print(f"fetch the missing or malformed files with: {DOWNLOAD_COMMAND.format(dir=args.dir)}")
    return EXIT_FAILED


# --- demo --------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_CANNOT_START
    from musetalk_service.api.requests import prepare_request
    from musetalk_service.api.schemas import LipsyncBody
    from musetalk_service.media.ffmpeg import find_ffmpeg
    from musetalk_service.pipeline.runner import LipsyncPipeline

    try:
        pipeline = LipsyncPipeline.load(settings)
    except WeightsError as e:
        print(f"no usable weights in {settings.models_dir} ({e.message})")
        settings = settings.model_copy(update={"models_dir": _tiny_weights()})
        print(f"using tiny random weights from {settings.models_dir}")
        pipeline = LipsyncPipeline.load(settings)
    random_weights = pipeline.health()["weights"] == "random"

    output = Path(args.output) if args.output else settings.output_dir / "demo.mp4"
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="musetalk-demo-", dir=settings.work_dir) as work:
        video, audio, face_box = _demo_inputs(Path(work), args.seconds, find_ffmpeg(settings.encode.ffmpeg_path))
        body = LipsyncBody(
            video_path=str(video), audio_path=str(audio), output_path=str(output),
            # Random weights can't detect a face: tell the pipeline where it is.
            face_box=face_box if random_weights else None,
        )
        try:
            _lipsync(pipeline, prepare_request(body, settings))
        except ServiceError as e:
            _error(f"[{e.code}] {e.message}")
            return EXIT_FAILED
    return 0


def _bench(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_CANNOT_START
    from musetalk_service.benchmark.faces import run_face_bench
    from musetalk_service.benchmark.lipsync import render_table, run_lipsync_bench
    from musetalk_service.nets.runtime import load_models

    size = tuple(args.size)
    try:
        if args.faces:
            # The face bench times S3FD + FAN whatever face.detector says (its stability part runs Haar itself).
            s3fd = settings.face.model_copy(update={"detector": "s3fd"})
            models = load_models(settings.model_copy(update={"face": s3fd}))
            report = run_face_bench(models, settings, seconds=args.seconds, size=size, fps=args.fps)
            print(json.dumps(report, indent=2))
        else:
            with tempfile.TemporaryDirectory(prefix="musetalk-bench-", dir=settings.work_dir) as work:
                report = run_lipsync_bench(
                    settings, Path(work), seconds=args.seconds, video_seconds=args.video_seconds, size=size, fps=args.fps,
                    runs=args.runs, checkpoint=_report_writer(args.out),
                )  # fmt: skip
            print(render_table(report))
    except ServiceError as e:
        _error(f"[{e.code}] {e.message}")
        return EXIT_FAILED
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def _tiny_weights() -> Path:
    """Tiny random weights in the user's cache, written on first use."""
    from musetalk_service.nets.check import check_weights
    from musetalk_service.nets.random_weights import write_random_weights

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "musetalk-service" / "tiny-random-weights"
    if not check_weights(cache).ok:
        write_random_weights(cache, "tiny")
    return cache


def _demo_inputs(work: Path, seconds: float, ffmpeg: str) -> tuple[Path, Path, list[int]]:
    """A short talking-head clip of scikit-image's astronaut, a speech-like track, and her face box."""
    from musetalk_service.media import synth

    video = synth.write_talking_head_video(work / "astronaut.mp4", seconds, DEMO_FPS, DEMO_SIZE, ffmpeg=ffmpeg)
    audio = synth.write_speech_like_audio(work / "speech.wav", seconds, ffmpeg=ffmpeg)
    # The head moves by a few percent only: the first frame's box holds for the whole clip.
    first = next(synth.talking_head_frames(1, DEMO_FPS, DEMO_SIZE))
    return video, audio, _find_face(first)


def _find_face(frame) -> list[int]:
    """MuseTalk's crop box for the best frontal face that OpenCV's Haar cascade finds in `frame`."""
    from musetalk_service.nets.haar_face import HaarFaceDetector, musetalk_box_from_face_box

    faces = HaarFaceDetector().detect(frame)[0]
    height, width = frame.shape[:2]
    return list(musetalk_box_from_face_box(faces[0], width, height))


# --- shared ------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, **overrides) -> Settings | None:
    """The settings with this command's flags on top; sets up logging. None (after saying why) if invalid."""
    try:
        settings = load_settings(args.config, models_dir=args.models, device=args.device, **overrides)
    except (pydantic.ValidationError, FileNotFoundError) as e:
        _configure_logging("INFO")
        _error(f"bad settings: {e}")
        return None
    _configure_logging(settings.log_level)
    return settings


def _configured_detector(args: argparse.Namespace) -> FaceDetector | None:
    """`face.detector` of the settings (`--config`, MUSETALK_* env): the weights commands need S3FD
    and FAN only for "s3fd". None, after saying why, if the settings are invalid."""
    try:
        return load_settings(args.config).face.detector
    except (pydantic.ValidationError, FileNotFoundError) as e:
        _error(f"bad settings: {e}")
        return None


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _random_weights_warning() -> None:
    lines = [
        "WARNING: RANDOM WEIGHTS",
        "The networks hold random numbers, not trained MuseTalk weights.",
        "The output has the real shape and compute cost, but its mouths are noise:",
        "it is NOT a lip-sync. For real output:",
        "  musetalk-service weights download --dir models",
    ]
    width = max(map(len, lines))
    print("\n".join(["#" * (width + 4), *(f"# {line:<{width}} #" for line in lines), "#" * (width + 4)]))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musetalk-service", description="MuseTalk 1.5 lip-sync service and tools.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(command=handler)
        return sub

    def settings_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--models", type=Path, help="weights folder (default: settings models_dir)")
        sub.add_argument("--device", help="torch device: auto, cpu, cuda:0... (default: settings device)")
        sub.add_argument("--config", type=Path, help="settings YAML (default: configs/default.yaml)")

    serve = command("serve", _serve, "Serve the HTTP API with the models resident.")
    settings_flags(serve)
    serve.add_argument("--host", help="address to listen on (default: settings host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: settings port)")
    serve.add_argument(
        "--ray", action="store_true",
        help="serve as a Ray Serve application (pip install 'musetalk-service[ray]'): joins RAY_ADDRESS, else starts a cluster here",
    )
    serve.add_argument("--replicas", type=int, help="with --ray: engine replicas, one per GPU (default: settings ray.engine_replicas)")

    run = command("run", _run, "Lip-sync one video to one speech track from the shell.")
    run.add_argument("--video", required=True, help="talking-head video")
    run.add_argument("--audio", required=True, help="speech track")
    run.add_argument("--output", help="output MP4 (default: output_dir/<video>_<audio>_<id>.mp4)")
    run.add_argument("--face-box", type=int, nargs=4, metavar=("X1", "Y1", "X2", "Y2"), help="skip detection: this box on every frame")
    run.add_argument("--fps", type=_fps_flag, help="output frame rate, 1 to 120: 25, 29.97 or 30000/1001 (default: the video's)")
    _option_flags(run)
    settings_flags(run)

    weights = commands.add_parser("weights", help="Write, download or check a weights folder.")
    weight_commands = weights.add_subparsers(required=True, metavar="ACTION")
    for name, handler, help in (
        ("random", _weights_random, "Write random weights in the official formats (tests, benchmarks)."),
        ("download", _weights_download, "Download the official weights from the Hugging Face hub."),
        ("check", _weights_check, "Say which files are present, missing or malformed; exit 1 unless all that face.detector needs are usable."),
    ):
        sub = weight_commands.add_parser(name, help=help, description=help)
        sub.set_defaults(command=handler)
        sub.add_argument("--dir", type=Path, required=True, help="the weights folder")
    for name in ("download", "check"):
        weight_commands.choices[name].add_argument(
            "--config", type=Path,
            help="settings YAML (default: configs/default.yaml); with face.detector: haar, S3FD and FAN are not needed",
        )
    weight_commands.choices["random"].add_argument(
        "--size", choices=("tiny", "full"), default="tiny", help="tiny: CPU-fast test networks; full: the official architectures"
    )

    bench = command("bench", _bench, "Benchmark the real pipeline on synthetic 1080p talking-head input.")
    settings_flags(bench)
    bench.add_argument("--seconds", type=float, default=120.0, help="audio length (default: 120)")
    bench.add_argument("--video-seconds", type=float, help="video length (default: the audio's)")
    bench.add_argument("--size", type=int, nargs=2, default=(1920, 1080), metavar=("W", "H"), help="frame size (default: 1920 1080)")
    bench.add_argument("--fps", type=int, default=25, help="frame rate (default: 25)")
    bench.add_argument(
        "--runs", type=_bench_runs, default=RUNS,
        help=f"comma-separated runs (default: {','.join(RUNS)}; also {','.join(EXTRA_RUNS)})",
    )  # fmt: skip
    bench.add_argument("--faces", action="store_true", help="benchmark the face phase only (per-frame vs tracked, box stability)")
    bench.add_argument("--out", type=Path, help="also write the report as JSON here")

    demo = command("demo", _demo, "Offline demo: lip-sync a clip built from scikit-image's astronaut.")
    settings_flags(demo)
    demo.add_argument("--output", help="output MP4 (default: output_dir/demo.mp4)")
    demo.add_argument("--seconds", type=float, default=3.0, help="length of the clip (default: 3)")
    return parser


def _report_writer(path: Path | None) -> Callable[[dict], None] | None:
    """Writes the bench's report to `path` as it grows (a bench cut off keeps its finished runs)."""
    if path is None:
        return None
    return lambda report: path.write_text(json.dumps(report, indent=2))


def _bench_runs(text: str) -> tuple[str, ...]:
    """`--runs`: comma-separated names of the bench's runs (argparse: exit 2 naming the unknown ones)."""
    runs = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in runs if name not in RUNS + EXTRA_RUNS]
    if unknown or not runs:
        raise argparse.ArgumentTypeError(f"unknown runs {unknown}: choose from {', '.join(RUNS + EXTRA_RUNS)}")
    return runs


def _fps_flag(text: str) -> Fraction:
    """`--fps` as the API reads `fps`: a decimal number is snapped, a rate string kept exactly (argparse: exit 2)."""
    try:
        value: float | str = float(text) if "/" not in text else text
    except ValueError:
        value = text  # parse_fps names what a rate string must look like
    try:
        return parse_fps(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: {e}") from None


def _option_flags(sub: argparse.ArgumentParser) -> None:
    """One flag per per-request option, typed from `LipsyncDefaults` (ranges are checked by the API schema)."""
    for name, field in LipsyncDefaults.model_fields.items():
        choices = typing.get_args(field.annotation) or None
        sub.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=None if choices else field.annotation,
            choices=choices, help=f"{field.description or ''} (default: settings lipsync.{name})".lstrip(),
        )
