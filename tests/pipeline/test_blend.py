"""Blend phase: parsing modes, the jaw procedure, mask geometry, the in-place blend and mask caching."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from musetalk_service.pipeline.blend import (
    BLUR_FRACTION,
    FaceBlender,
    ParsingMask,
    _CachedMask,
    _parser_input,
    crop_square,
    parsing_region,
    square_mask,
)
from musetalk_service.contract import LipsyncRequest


class _FakeParser(torch.nn.Module):
    """BiSeNet stand-in: logits of a fixed label map whatever the input; records its calls."""

    def __init__(self, labels: np.ndarray):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 19).permute(2, 0, 1).float()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.logits.expand(x.shape[0], -1, -1, -1)


def _models(labels: np.ndarray | None = None) -> SimpleNamespace:
    labels = np.ones((512, 512), np.uint8) if labels is None else labels  # all skin
    return SimpleNamespace(face_parser=_FakeParser(labels), device=torch.device("cpu"), dtype=torch.float32)


def _request(**options) -> LipsyncRequest:
    options.setdefault("parsing_mode", "raw")
    return LipsyncRequest(video_path=Path("v.mp4"), audio_path=Path("a.wav"), output_path=Path("o.mp4"), **options)


def _scene(seed: int = 0, size=(240, 320)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    return frame, face


BOX = (100, 60, 200, 180)  # 100x120: square half-side 90, centre (150, 120)


def test_crop_square():
    assert crop_square((100, 100, 200, 180)) == ((75, 65, 225, 215), 75)
    assert crop_square(BOX) == ((60, 30, 240, 210), 90)
    assert crop_square((0, 0, 3, 3)) == ((0, 0, 2, 2), 1)


def test_plain_modes_keep_their_classes():
    labels = np.repeat(np.arange(19, dtype=np.uint8), 27)[: 512 - 1]
    labels = np.tile(np.append(labels, 0), (512, 1))
    for mode, kept in [("raw", {1, 11, 12, 13}), ("neck", {1, 11, 12, 13, 14})]:
        region = parsing_region(labels, mode)
        assert set(np.unique(labels[region == 255])) == kept
        assert set(np.unique(region)) == {0, 255}


def test_jaw_spreads_skin_up_16_px_and_down_6_px_in_the_centre():
    labels = np.zeros((512, 512), np.uint8)
    labels[300, 256] = 1  # one skin pixel in the central band
    region = parsing_region(labels, "jaw") > 0
    rows = np.flatnonzero(region.any(axis=1))
    assert (rows[0], rows[-1]) == (284, 306)
    assert np.flatnonzero(region[284]).tolist() == list(range(246, 267))  # 21 px wide, 16 px up
    assert np.flatnonzero(region[306]).tolist() == [256]  # the cone's tip, 6 px down
    assert np.flatnonzero(region[300]).tolist() == list(range(250, 263))


def test_jaw_erodes_the_cheeks_and_drops_the_nose():
    labels = np.zeros((512, 512), np.uint8)
    labels[200:300, 20:490] = 1
    labels[250:260, 240:270] = 10  # nose inside the skin
    labels[400:410, 250:260] = 12  # a lip far from any skin is kept anyway
    region = parsing_region(labels, "jaw", 90, 90) > 0
    # Skin is first dilated (16 rows up, 6 down, 10 px sideways: rows 184..305, cols 10..499).
    # Outer cheek columns (0..166 and 346..511) then use the erosion of that: 2 x 17 px per side
    # and one row top and bottom per iteration.
    assert not region[250, 43] and region[250, 44]
    assert region[250, 465] and not region[250, 466]
    assert not region[185, 100] and region[186, 100] and region[303, 100] and not region[304, 100]
    # The central band (167..345) keeps the dilation itself; the bands meet at columns 166/167.
    assert region[184, 200] and not region[183, 200] and region[305, 200] and not region[306, 200]
    assert not region[185, 166] and region[185, 167] and region[185, 345] and not region[185, 346]
    assert not region[250:260, 240:270].any()
    assert region[400:410, 250:260].all()


def test_mask_is_zero_above_the_middle_and_outside_the_box_plus_blur():
    region = np.full((512, 512), 255, np.uint8)
    square, s = crop_square(BOX)
    mask = square_mask(region, BOX, square)
    side = 2 * s
    assert mask.shape == (side, side) and mask.dtype == np.uint8
    half_kernel = int(BLUR_FRACTION * side // 2 * 2) // 2
    bx1, _, bx2, by2 = (BOX[0] - square[0], BOX[1] - square[1], BOX[2] - square[0], BOX[3] - square[1])
    assert not mask[: s - half_kernel].any()
    assert not mask[:, : bx1 - half_kernel].any() and not mask[:, bx2 + half_kernel :].any()
    assert not mask[by2 + half_kernel :].any()
    assert (mask[s + half_kernel : by2 - half_kernel, bx1 + half_kernel : bx2 - half_kernel] == 255).all()


def test_blend_is_the_face_where_alpha_is_1_and_the_frame_where_it_is_0():
    frame, face = _scene()
    original = frame.copy()
    blender = FaceBlender(_models(), _request())
    out = blender.blend(frame, face, BOX, 0)
    assert out is frame  # in place

    x1, y1, x2, y2 = BOX
    (sx1, sy1, _, _), s = crop_square(BOX)
    k = int(BLUR_FRACTION * 2 * s // 2 * 2) // 2
    pasted = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    middle = sy1 + s
    # Full alpha: exactly the generated face.
    np.testing.assert_array_equal(out[middle + k : y2 - k, x1 + k : x2 - k], pasted[middle + k - y1 : -k, k:-k])
    # Zero alpha (upper part of the box) and everything outside the box: exactly the original.
    np.testing.assert_array_equal(out[: middle - k], original[: middle - k])
    outside = np.ones(frame.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(out[outside], original[outside])
    # The blurred seam lies between the two.
    seam = out[middle, x1 + k : x2 - k]
    ends = np.stack([original[middle, x1 + k : x2 - k], pasted[middle - y1, k:-k]])
    assert np.all(ends.min(axis=0) <= seam) and np.all(seam <= ends.max(axis=0))


def test_mask_is_reused_within_mask_every_and_recomputed_at_the_boundary():
    models = _models()
    blender = FaceBlender(models, _request(mask_every=5))
    frame, face = _scene()
    calls = []
    for index in range(12):
        blender.blend(frame.copy(), face, BOX, index)
        calls.append(len(models.face_parser.inputs))
    assert calls == [1] * 5 + [2] * 5 + [3] * 2


def test_a_batch_parses_its_missing_masks_in_one_call():
    models = _models()
    blender = FaceBlender(models, _request(mask_every=4))
    frame, face = _scene()
    frames = np.stack([frame] * 10)
    blender.blend_batch(frames, [face] * 10, [BOX] * 9 + [None], list(range(10)))
    assert [x.shape[0] for x in models.face_parser.inputs] == [3]  # keys 0, 4, 8
    assert not np.array_equal(frames[0], frame) and np.array_equal(frames[9], frame)


def test_cache_is_bounded_unless_retained():
    frame, face = _scene()
    streaming = FaceBlender(_models(), _request(mask_every=5))
    retaining = FaceBlender(_models(), _request(mask_every=5), retain=True)
    for index in range(50):
        streaming.blend(frame.copy(), face, BOX, index)
        retaining.blend(frame.copy(), face, BOX, index)
    assert len(streaming._masks) == 1
    assert len(retaining._masks) == 10
    # Ping-pong back over retained keys parses nothing new.
    parsed = len(retaining.parser.models.face_parser.inputs)
    for index in reversed(range(50)):
        retaining.blend(frame.copy(), face, BOX, index)
    assert len(retaining.parser.models.face_parser.inputs) == parsed


def test_a_reused_mask_follows_a_moved_and_resized_box():
    frame, face = _scene()
    blender = FaceBlender(_models(), _request(mask_every=5))
    blender.blend(frame.copy(), face, BOX, 0)
    moved = (140, 70, 220, 166)  # smaller, elsewhere: the key-0 mask is scaled to its square
    original = frame.copy()
    out = blender.blend(frame, face, moved, 1)
    assert blender.fallbacks == 0 and len(blender.parser.models.face_parser.inputs) == 1
    x1, y1, x2, y2 = moved
    inside = np.zeros(frame.shape[:2], bool)
    inside[y1:y2, x1:x2] = True
    assert np.array_equal(out[~inside], original[~inside])
    assert not np.array_equal(out[inside], original[inside])


def test_failed_fast_blend_falls_back_to_a_fresh_mask():
    frame, face = _scene()
    blender = FaceBlender(_models(), _request(mask_every=5))
    blender.blend(frame.copy(), face, BOX, 0)
    blender._masks[0] = _CachedMask(180, 100, 50, np.zeros((40, 40, 3), np.uint8))  # a broken mask
    out = blender.blend(frame.copy(), face, BOX, 1)
    assert blender.fallbacks == 1
    fresh = FaceBlender(_models(), _request(mask_every=5)).blend(frame.copy(), face, BOX, 1)
    np.testing.assert_array_equal(out, fresh)
    blender.blend(frame.copy(), face, BOX, 2)  # the fresh mask replaced the broken one
    assert blender.fallbacks == 1


def test_frames_without_a_box_pass_through():
    frame, face = _scene()
    original = frame.copy()
    models = _models()
    out = FaceBlender(models, _request()).blend(frame, face, None, 0)
    assert np.array_equal(out, original) and models.face_parser.inputs == []


def test_face_at_the_frame_edge():
    frame, face = _scene(size=(100, 120))
    original = frame.copy()
    models = _models()
    box = (0, 20, 60, 100)  # square (-30, 0, 90, 120) runs off the left and bottom
    out = FaceBlender(models, _request()).blend(frame, face, box, 0)
    assert out.shape == original.shape
    assert not np.array_equal(out[60:100, 0:60], original[60:100, 0:60])
    assert np.array_equal(out[:, 60:], original[:, 60:])
    # Outside the frame the parser saw black: (0 - mean) / std in every channel.
    seen = models.face_parser.inputs[0][0, :, 256, 0]
    black = -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(seen, black)


@pytest.mark.parametrize("mode", ["raw", "neck", "jaw"])
def test_real_parser_batches_and_gives_square_masks(tiny_bundle, mode):
    frame, _ = _scene()
    boxes = [BOX, (20, 30, 80, 90)]
    masks = ParsingMask(tiny_bundle, mode)([frame, frame], boxes)
    assert [m.shape for m in masks] == [(180, 180), (90, 90)]
    assert all(m.dtype == np.uint8 for m in masks)


def test_masks_made_on_threads_are_each_their_own_frames_and_boxes(tiny_bundle):
    """More squares than threads and than one BiSeNet batch: each mask is its own frame's and
    box's, as made one at a time from the same label maps."""
    parser = ParsingMask(tiny_bundle, "jaw")
    frames = [_scene(seed)[0] for seed in range(11)]
    boxes = [(40 + 7 * i, 30 + 3 * i, 150 + 5 * i, 170 + 2 * i) for i in range(11)]
    squares = [crop_square(box)[0] for box in boxes]
    seen = []
    hook = tiny_bundle.face_parser.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        labels = parser.labels(frames, squares)
    finally:
        hook.remove()
    pixels = torch.cat(seen)  # BiSeNet saw each frame's own square, in order
    for i, (frame, square) in enumerate(zip(frames, squares)):
        bgr = torch.from_numpy(_parser_input(frame, square)).permute(2, 0, 1).flip(0).float()
        torch.testing.assert_close(pixels[i], ((bgr[None] - parser._mean) / parser._std)[0])
    masks = parser(frames, boxes)
    for label_map, box, square, mask in zip(labels, boxes, squares, masks):
        np.testing.assert_array_equal(mask, square_mask(parsing_region(label_map, "jaw"), box, square))
