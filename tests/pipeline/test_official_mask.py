"""The parsing mask and the blend equal the official MuseTalk steps (spec section 7), written out
here with PIL as `get_image` / `face_seg` / `FaceParsing` do them, on the same BiSeNet labels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from musetalk_service.pipeline.blend import FaceBlender
from musetalk_service.pipeline.compose import GpuComposer

from .test_blend import _models, _request
from .test_compose import _labels

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


def _official(frame: np.ndarray, face: np.ndarray, box, labels: np.ndarray):
    """(parser input RGB 512x512, mask over the square, blended frame BGR), mode raw, blur 5 %."""
    body = Image.fromarray(np.ascontiguousarray(frame[:, :, ::-1]))
    x, y, x1, y1 = box
    xc, yc = (x + x1) // 2, (y + y1) // 2
    s = int(max(x1 - x, y1 - y) // 2 * 1.5)
    crop_box = (xc - s, yc - s, xc + s, yc + s)
    face_large = body.crop(crop_box)  # black outside the frame
    parser_input = np.asarray(face_large.resize((512, 512), Image.BILINEAR))
    region = Image.fromarray((np.isin(labels, (1, 11, 12, 13)) * 255).astype(np.uint8))
    seg = region.resize(face_large.size, Image.BICUBIC)
    inner = (x - crop_box[0], y - crop_box[1], x1 - crop_box[0], y1 - crop_box[1])
    boxed = Image.new("L", face_large.size, 0)
    boxed.paste(seg.crop(inner), inner)
    width, height = boxed.size
    top = int(height * 0.5)
    lower = Image.new("L", face_large.size, 0)
    lower.paste(boxed.crop((0, top, width, height)), (0, top))
    kernel = int(0.05 * width // 2 * 2) + 1
    mask = cv2.GaussianBlur(np.array(lower), (kernel, kernel), 0)
    generated = Image.fromarray(cv2.resize(face, (x1 - x, y1 - y))[:, :, ::-1])
    face_large.paste(generated, inner[:2])
    body.paste(face_large, crop_box[:2], Image.fromarray(mask))
    return parser_input, mask, np.asarray(body)[:, :, ::-1]


@pytest.mark.parametrize(
    "size, box",
    [
        ((720, 1280), (440, 150, 840, 590)),  # square 660 px: parser input shrunk, mask enlarged
        ((480, 640), (200, 100, 400, 340)),  # square 360 px: parser input enlarged, mask shrunk
        ((480, 640), (-40, 260, 200, 480)),  # square 360 px off the left and bottom edges
    ],
    ids=["660px", "360px", "edge"],
)
def test_mask_and_blend_equal_the_official_steps(size, box):
    rng = np.random.default_rng(7)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (*size, 3), dtype=np.uint8), (5, 5), 0)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    labels = _labels()
    parser_input, mask, blended = _official(frame, face, box, labels)

    blender = FaceBlender(_models(labels), _request(parsing_mode="raw", mask_every=1))
    (ours,) = blender.parser([frame], [box])
    assert np.abs(ours.astype(int) - mask).max() <= 1
    seen = blender.parser.models.face_parser.inputs[0][0]  # RGB, normalised
    levels = (seen * STD + MEAN) * 255
    assert torch.equal(levels.round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(parser_input.copy()))

    numpy_out = blender.blend(frame.copy(), face, box, 0)
    assert np.abs(numpy_out.astype(int) - blended).max() <= 1
    composer = GpuComposer(FaceBlender(_models(labels), _request(parsing_mode="raw", mask_every=1)), "cpu")
    device_out = composer.compose(frame[None], face[None], [box], [0], bgr=True).bgr[0]
    assert np.abs(device_out.astype(int) - blended).max() <= 1
    assert not np.array_equal(blended, frame)  # the face was blended
