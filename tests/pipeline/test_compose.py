"""Compose on the device: the same composite as the numpy blend, yuv420p as ffmpeg makes it."""

from __future__ import annotations

import subprocess
from fractions import Fraction

import numpy as np
import pytest
import torch

from musetalk_service.media.decode import VideoReader
from musetalk_service.media.encode import VideoEncoder, encoder_for
from musetalk_service.media.rawvideo import frame_bytes, yuv420p_frame_bytes
from musetalk_service.media.probe import probe_video
from musetalk_service.media.synth import talking_head_frames
from musetalk_service.pipeline.blend import FaceBlender, _CachedMask
from musetalk_service.pipeline.colour import bgr_to_yuv420p, yuv420p_planes, yuv420p_to_bgr
from musetalk_service.pipeline.compose import GpuComposer
from musetalk_service.settings import EncodeSettings

from .test_blend import _models, _request


def _labels() -> np.ndarray:
    """A face-like BiSeNet label map: a skin ellipse, a nose, lips: a mask with real structure."""
    y, x = np.mgrid[:512, :512]
    labels = np.zeros((512, 512), np.uint8)
    labels[((x - 256) / 190) ** 2 + ((y - 270) / 220) ** 2 < 1] = 1
    labels[230:330, 226:286] = 10
    labels[370:400, 200:312] = 12
    return labels


def _frames(count: int, width: int, height: int) -> np.ndarray:
    return np.stack(list(talking_head_frames(count, 25, (width, height))))


def _noise(count: int, width: int = 256, height: int = 256) -> np.ndarray:
    """Random levels: the worst case for the resize's roundings and for chroma subsampling."""
    return np.random.default_rng(1).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


W, H = 321, 241  # odd on purpose
# Source frames 0-2 share mask key 0 (mask_every=3) so the mask is rescaled for moved boxes.
BOXES = [
    (101, 61, 198, 178),  # 97 x 117: the 256 face is shrunk
    (95, 55, 206, 190),  # moved and grown, same mask key
    None,
    (20, 10, 301, 235),  # 281 x 225: enlarged
    (0, 120, 90, 241),  # touches the left and bottom edges; its square runs off the frame
    (250, 30, 321, 151),  # touches the right edge
]
SOURCES = [0, 1, 2, 3, 4, 5]


def _composer(device: str = "cpu", **request) -> GpuComposer:
    """A composer over a blender whose (fake) parser always sees `_labels`, on CPU."""
    request = {"parsing_mode": "jaw", "mask_every": 3, **request}
    return GpuComposer(FaceBlender(_models(_labels()), _request(**request)), device)


def _numpy_blend(blender: FaceBlender, frames: np.ndarray, faces: np.ndarray, boxes, sources) -> np.ndarray:
    out = frames.copy()
    face_iter = iter(faces)
    per_frame = [None if box is None else next(face_iter) for box in boxes]
    blender.blend_batch(out, per_frame, boxes, sources)
    return out


def yuv420p_reference(frames: np.ndarray) -> np.ndarray:
    """BT.709 limited range in float64, straight from the definition; 2x2 chroma means."""
    n, h, w, _ = frames.shape
    kr, kb = 0.2126, 0.0722
    kg = 1 - kr - kb

    def planes(bgr):
        b, g, r = (bgr[..., c].astype(np.float64) for c in range(3))
        luma = kr * r + kg * g + kb * b
        return luma, (b - luma) / (2 * (1 - kb)), (r - luma) / (2 * (1 - kr))

    luma, _, _ = planes(frames)
    padded = np.pad(frames.astype(np.float64), ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    means = (padded[:, ::2, ::2] + padded[:, 1::2, ::2] + padded[:, ::2, 1::2] + padded[:, 1::2, 1::2]) / 4
    _, pb, pr = planes(means)
    y = np.floor(16 + 219 / 255 * luma + 0.5)
    u = np.floor(128 + 224 / 255 * pb + 0.5)
    v = np.floor(128 + 224 / 255 * pr + 0.5)
    return np.concatenate([p.reshape(n, -1) for p in (y, u, v)], axis=1).astype(np.uint8)


def _ffmpeg_yuv420p(ffmpeg: str, frames: np.ndarray) -> np.ndarray:
    """ffmpeg's own bgr24 -> yuv420p (BT.709, tv range) of `frames`, `[n, frame_bytes]`."""
    n, h, w, _ = frames.shape
    args = [
        ffmpeg, "-v", "error", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}", "-i", "-",
        "-vf", "scale=out_color_matrix=bt709:out_range=tv", "-pix_fmt", "yuv420p", "-f", "rawvideo", "-",
    ]  # fmt: skip
    out = subprocess.run(args, input=frames.tobytes(), capture_output=True, check=True).stdout
    return np.frombuffer(out, np.uint8).reshape(n, -1)


def _planes(yuv: np.ndarray, width: int, height: int) -> list[np.ndarray]:
    """Y, U, V `[n, h, w]` of a `[n, frame_bytes]` yuv420p array."""
    cw, ch = (width + 1) // 2, (height + 1) // 2
    y, u, v = np.split(yuv, [width * height, width * height + cw * ch], axis=1)
    return [y.reshape(-1, height, width), u.reshape(-1, ch, cw), v.reshape(-1, ch, cw)]


# --- the composite ------------------------------------------------------------------------------


def test_composite_equals_the_numpy_blend_within_one_level():
    frames, faces = _frames(6, W, H), _noise(5)
    composer = _composer()
    out = composer.compose(frames, faces, BOXES, SOURCES, bgr=True).bgr
    parsed = composer.blender.parser.models.face_parser.inputs
    assert [x.shape[0] for x in parsed] == [2]  # mask keys 0 and 3, one BiSeNet pass
    expected = _numpy_blend(composer.blender, frames, faces, BOXES, SOURCES)
    # The numpy blend found every mask in the cache the composer filled: the same alpha.
    assert len(parsed) == 1
    assert np.abs(out.astype(int) - expected).max() <= 1  # the resized faces' roundings
    assert np.array_equal(out[2], frames[2])  # no box: untouched
    for k, box in enumerate(BOXES):
        if box is None:
            continue
        x1, y1, x2, y2 = box
        outside = np.ones((H, W), bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(out[k][outside], frames[k][outside])
        assert not np.array_equal(out[k][~outside], frames[k][~outside])


def test_the_callers_frames_are_only_read():
    frames, faces = _frames(6, W, H), _noise(5)
    original = frames.copy()
    frames.flags.writeable = False  # a shared source frame, output twice in ping-pong
    _composer().compose(frames, faces, BOXES, SOURCES)
    assert np.array_equal(frames, original)


def test_faces_as_numpy_uint8_tensor_or_float_tensor_compose_the_same():
    frames, faces = _frames(6, W, H), _noise(5)
    results = [
        _composer().compose(frames, given, BOXES, SOURCES, bgr=True).bgr.copy()
        for given in (faces, torch.from_numpy(faces), torch.from_numpy(faces).float())
    ]
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_a_batch_without_faces_passes_through():
    frames = _frames(3, W, H)
    composed = _composer().compose(frames, None, [None] * 3, [0, 1, 2], bgr=True)
    assert np.array_equal(composed.bgr, frames)
    assert np.array_equal(composed.yuv.reshape(3, -1), bgr_to_yuv420p(torch.from_numpy(frames)).numpy())


def test_a_broken_cached_mask_falls_back_to_a_fresh_one():
    frames, faces = _frames(2, W, H), _noise(2)
    composer = _composer()
    composer.compose(frames[:1], faces[:1], BOXES[:1], [0])
    composer.blender._masks[0] = _CachedMask(180, 0, 0, None)  # unusable: no values
    out = composer.compose(frames[1:], faces[1:], BOXES[1:2], [1], bgr=True).bgr.copy()
    assert composer.blender.fallbacks == 1
    fresh = _composer(mask_every=1).compose(frames[1:], faces[1:], BOXES[1:2], [1], bgr=True).bgr
    assert np.array_equal(out, fresh)


def test_counts_must_match():
    frames, faces = _frames(2, W, H), _noise(2)
    with pytest.raises(ValueError, match="2 boxes but 1 faces"):
        _composer().compose(frames, faces[:1], BOXES[:2], [0, 1])
    with pytest.raises(ValueError, match="2 frames, 1 boxes"):
        _composer().compose(frames, faces[:1], BOXES[:1], [0])


# --- yuv420p ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(320, 240), (321, 241), (33, 2), (2, 17)], ids=str)
def test_yuv420p_matches_the_definition_and_the_encoders_layout(size):
    width, height = size
    frames = np.concatenate([_frames(2, width, height), _noise(1, width, height)])
    yuv = bgr_to_yuv420p(torch.from_numpy(frames)).numpy()
    assert yuv.shape == (3, yuv420p_frame_bytes(width, height)) == (3, frame_bytes("yuv420p", width, height))
    diff = np.abs(yuv.astype(int) - yuv420p_reference(frames))
    # float32 against float64: only exact .5 ties may round apart.
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4


def test_yuv420p_matches_ffmpegs_conversion(ffmpeg_exe):
    frames = np.concatenate([_frames(3, 320, 240), _noise(1, 320, 240)])
    ours = bgr_to_yuv420p(torch.from_numpy(frames)).numpy().astype(int)
    theirs = _ffmpeg_yuv420p(ffmpeg_exe, frames)
    # ffmpeg's bgr24 -> yuv420p fast path truncates where we round: it is 0 or 1 level below,
    # in Y and chroma alike (about half the values).
    assert set(np.unique(theirs - ours)) <= {-1, 0}


def test_odd_sizes_match_ffmpeg_where_the_encoder_keeps_them(ffmpeg_exe):
    """The encoder crops an odd frame's last column/row away; there we equal ffmpeg's conversion of
    the cropped frames. (ffmpeg converting the odd frame itself resamples chroma to ceil(W/2)
    samples across the full width instead of 2x2 blocks: up to ~20 levels off at sharp edges.)"""
    frames = _frames(3, W, H)
    planes = _planes(bgr_to_yuv420p(torch.from_numpy(frames)).numpy().astype(int), W, H)
    theirs = _planes(_ffmpeg_yuv420p(ffmpeg_exe, frames[:, : H - 1, : W - 1]), W - 1, H - 1)
    for ours, cropped in zip(planes, theirs):
        _, h, w = cropped.shape
        assert set(np.unique(cropped - ours[:, :h, :w])) <= {-1, 0}


def test_compose_yuv_is_the_composites_conversion():
    frames, faces = _frames(6, W, H), _noise(5)
    composed = _composer().compose(frames, faces, BOXES, SOURCES, bgr=True)
    expected = bgr_to_yuv420p(torch.from_numpy(composed.bgr)).numpy().ravel()
    assert composed.yuv.dtype == np.uint8 and np.array_equal(composed.yuv, expected)


@pytest.mark.parametrize("size", [(320, 240), (W, H)], ids=str)
def test_round_trip_through_the_encoder(ffmpeg_exe, tmp_path, size):
    """yuv420p bytes written as they are, decoded back: as close to the composite as the usual
    bgr24 path gets (H.264 at crf 18 loses about as much either way)."""
    width, height = size
    frames, faces = _frames(6, width, height), _frames(4, 256, 256)
    boxes = [(60, 40, 190, 200), None, (0, 100, 120, height), (200, 10, width, 150), (30, 30, 290, 230), None]
    composed = _composer().compose(frames, faces, boxes, SOURCES, bgr=True)
    composite = composed.bgr.copy()
    choice = encoder_for("libx264", EncodeSettings())
    decoded = {}
    for pix_fmt, data in [("yuv420p", composed.yuv), ("bgr24", composite)]:
        path = tmp_path / f"{pix_fmt}.mp4"
        with VideoEncoder(path, width, height, Fraction(25), choice, ffmpeg_exe, input_pix_fmt=pix_fmt) as encoder:
            encoder.write(data)
        with VideoReader(path, probe_video(path), None, ffmpeg_exe) as reader:
            decoded[pix_fmt] = reader.read(10)
    kept = composite[:, : height - height % 2, : width - width % 2].astype(float)
    assert decoded["yuv420p"].shape == kept.shape
    error = {fmt: np.abs(frames_back - kept).mean() for fmt, frames_back in decoded.items()}
    # Tagged right, the yuv420p path is the closer one (ffmpeg's bgr24 conversion truncates):
    # about 2.7 against 3.0 mean levels here, mostly chroma lost at the astronaut's sharp edges.
    assert error["yuv420p"] < 3.5 and error["yuv420p"] < error["bgr24"] + 0.25, error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_composes_as_the_cpu_does():
    frames, faces = _frames(6, W, H), _noise(5)
    cpu = _composer().compose(frames, faces, BOXES, SOURCES, bgr=True)
    cpu_bgr, cpu_yuv = cpu.bgr.copy(), cpu.yuv.copy()
    gpu = _composer("cuda").compose(frames, torch.from_numpy(faces).cuda(), BOXES, SOURCES, bgr=True)
    assert np.abs(gpu.bgr.astype(int) - cpu_bgr).max() <= 1
    assert np.abs(gpu.yuv.astype(int) - cpu_yuv).max() <= 1


# --- yuv420p frames in, blended in place ------------------------------------------------------


def _yuv_frames(count: int, width: int, height: int) -> np.ndarray:
    """yuv420p frames as a decoder gives them: the talking-head frames, then noise."""
    frames = np.concatenate([_frames(count - 1, width, height), _noise(1, width, height)])
    return bgr_to_yuv420p(torch.from_numpy(frames)).numpy()


def _to_bgr(yuv: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.stack([yuv420p_to_bgr(*map(torch.from_numpy, yuv420p_planes(f, width, height))).numpy() for f in yuv])


def _blended_pixels(composer: GpuComposer, width: int, height: int, boxes, sources) -> np.ndarray:
    """`[n, H, W]` True where the frame's alpha is above 0 (the masks the composer used)."""
    regions = composer.blender.regions((height, width), boxes, sources, None)
    out = np.zeros((len(boxes), height, width), bool)
    for k, region in enumerate(regions):
        if region is not None:
            out[k, region.top : region.bottom, region.left : region.right] = region.mask > 0
    return out


def test_yuv_to_bgr_inverts_the_conversion():
    """yuv420p -> BGR -> yuv420p gives the planes back, to a level of rounding but where a 2x2 chroma
    mean puts a pixel outside the RGB cube and it is clamped: a handful of samples on the astronaut's
    sharp edges, about 4 % on noise."""
    flat = np.broadcast_to(np.array([40, 120, 200], np.uint8), (1, 6, 8, 3)).copy()
    yuv = bgr_to_yuv420p(torch.from_numpy(flat)).numpy()
    assert np.abs(_to_bgr(yuv, 8, 6).astype(int) - flat).max() <= 1
    yuv = _yuv_frames(2, W, H)
    again = bgr_to_yuv420p(torch.from_numpy(_to_bgr(yuv, W, H))).numpy().astype(int)
    diff = np.abs(again - yuv)
    assert (diff[0] > 1).sum() < 10 and diff[0].max() <= 2
    assert (diff[1] > 1).mean() < 0.05 and diff[1].mean() < 0.25


@pytest.mark.parametrize("size", [(W, H), (320, 240)], ids=str)
def test_compose_yuv_blends_as_the_numpy_path_and_leaves_every_other_sample_as_decoded(size):
    width, height = size
    boxes = [None if b is None else (b[0], b[1], min(b[2], width), min(b[3], height)) for b in BOXES]
    yuv, faces = _yuv_frames(6, width, height), _noise(5)
    composer = _composer()
    out = composer.compose_yuv(yuv.copy(), width, height, faces, boxes, SOURCES)
    # The numpy path on the same frames as BGR, with the masks the composer parsed, converted back.
    expected = bgr_to_yuv420p(torch.from_numpy(_numpy_blend(composer.blender, _to_bgr(yuv, width, height), faces, boxes, SOURCES)))
    blended = _blended_pixels(composer, width, height, boxes, SOURCES)
    padded = np.pad(blended, ((0, 0), (0, height % 2), (0, width % 2)))
    touched = padded.reshape(6, (height + 1) // 2, 2, (width + 1) // 2, 2).any(axis=(2, 4))
    for (ours, theirs, given), moved in zip(
        zip(_planes(out, width, height), _planes(expected.numpy(), width, height), _planes(yuv, width, height)),
        (blended, touched, touched),
    ):
        assert moved.any()
        assert np.abs(ours[moved].astype(int) - theirs[moved]).max() <= 1
        assert np.array_equal(ours[~moved], given[~moved])  # bit for bit, as decoded
        assert not np.array_equal(ours[moved], given[moved])
    assert np.array_equal(out[2], yuv[2])  # no box


def test_compose_yuv_without_faces_returns_the_frames_untouched():
    yuv = _yuv_frames(3, W, H)
    out = _composer().compose_yuv(yuv.copy(), W, H, None, [None] * 3, [0, 1, 2])
    assert np.array_equal(out, yuv)


def test_compose_yuv_parses_a_missing_mask_from_the_frame_as_bgr():
    yuv, faces = _yuv_frames(2, W, H), _noise(2)
    composer = _composer()
    composer.compose_yuv(yuv[:1].copy(), W, H, faces[:1], BOXES[:1], [0])
    parsed = composer.blender.parser.models.face_parser.inputs
    assert len(parsed) == 1
    # BiSeNet saw the square cut from the frame converted to BGR (RGB, normalised, in its input).
    reference = _composer()
    reference.blender.prepare_masks(_to_bgr(yuv[:1], W, H), BOXES[:1], [0])
    assert torch.equal(parsed[0], reference.blender.parser.models.face_parser.inputs[0])
    # A broken cached mask: that frame is redone from a fresh mask, as in `compose`.
    composer.blender._masks[0] = _CachedMask(180, 0, 0, None)
    out = composer.compose_yuv(yuv[1:].copy(), W, H, faces[1:], BOXES[1:2], [1])
    assert composer.blender.fallbacks == 1
    fresh = _composer(mask_every=1).compose_yuv(yuv[1:].copy(), W, H, faces[1:], BOXES[1:2], [1])
    assert np.array_equal(out, fresh)


def test_compose_yuv_checks_its_frames():
    with pytest.raises(ValueError, match=r"yuv420p frames \[n, 116323\] for 321x241"):
        _composer().compose_yuv(np.zeros((1, 100), np.uint8), W, H, None, [None], [0])
    with pytest.raises(ValueError, match="1 boxes but 0 faces"):
        _composer().compose_yuv(_yuv_frames(2, W, H)[:1], W, H, None, BOXES[:1], [0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_composes_yuv_as_the_cpu_does():
    yuv, faces = _yuv_frames(6, W, H), _noise(5)
    cpu = _composer().compose_yuv(yuv.copy(), W, H, faces, BOXES, SOURCES)
    gpu = _composer("cuda").compose_yuv(yuv.copy(), W, H, torch.from_numpy(faces).cuda(), BOXES, SOURCES)
    assert np.abs(gpu.astype(int) - cpu).max() <= 1


# --- weights (`silence: source`'s cross-fades, pipeline/silence.py) ---------------------------------

FADE = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
"""One frame's weights down a fade; the last frame is silent, not generated: it has no box."""


def _faded(composer: GpuComposer, yuv: bool, weights) -> tuple[np.ndarray, np.ndarray]:
    """The source frames (one frame, repeated) and their composite with `FADE`'s boxes and `weights`."""
    frames = np.repeat(_frames(1, W, H), len(FADE), axis=0)
    boxes = [BOXES[0] if w > 0 else None for w in FADE]
    faces, sources = _noise(len(FADE) - 1), [0] * len(FADE)
    if yuv:
        given = bgr_to_yuv420p(torch.from_numpy(frames)).numpy()
        return given, composer.compose_yuv(given.copy(), W, H, faces, boxes, sources, weights=weights)
    return frames, composer.compose(frames, faces, boxes, sources, bgr=True, weights=weights).bgr


@pytest.mark.parametrize("yuv", [False, True], ids=["compose", "compose_yuv"])
def test_weights_fade_the_face_monotonically_to_the_source_and_weight_1_is_no_weights(yuv):
    composer = _composer()
    source, unweighted = _faded(composer, yuv, None)
    _, ones = _faded(composer, yuv, [1.0] * 5 + [0.0])
    assert np.array_equal(ones, unweighted)  # weight 1 blends bit for bit as without weights
    _, faded = _faded(composer, yuv, FADE)
    assert np.array_equal(faded[0], unweighted[0])
    distance = [float(np.abs(f.astype(int) - source[k]).mean()) for k, f in enumerate(faded)]
    assert all(a > b for a, b in zip(distance, distance[1:])), distance
    assert distance[-1] == 0  # weight 0: the source frame as it is


def test_a_frame_with_a_box_and_weight_0_is_refused():
    frames, faces = _frames(2, W, H), _noise(2)
    with pytest.raises(ValueError, match="weight outside"):
        _composer().compose(frames, faces, BOXES[:2], [0, 1], weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="2 frames but 1 weights"):
        _composer().compose(frames, faces, BOXES[:2], [0, 1], weights=[1.0])
