"""Compose on the device: the same composite as the numpy blend, yuv420p as ffmpeg makes it."""

from __future__ import annotations

import subprocess
from fractions import Fraction

import numpy as np
import pytest
import torch

from musetalk_service.media.decode import VideoReader
from musetalk_service.media.encode import VideoEncoder, _frame_bytes, encoder_for
from musetalk_service.media.probe import probe_video
from musetalk_service.media.synth import talking_head_frames
from musetalk_service.pipeline.blend import FaceBlender, _CachedMask
from musetalk_service.pipeline.compose import GpuComposer, bgr_to_yuv420p, yuv420p_frame_bytes
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
    assert yuv.shape == (3, yuv420p_frame_bytes(width, height)) == (3, _frame_bytes("yuv420p", width, height))
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
