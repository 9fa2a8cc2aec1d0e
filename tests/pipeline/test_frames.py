"""A new video's frames made BGR on the device: the decoder's colours, and the CPU code reading
regions of them gets exactly what it gets from a numpy batch of the same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk_service.media.decode import VideoReader
from musetalk_service.media.probe import probe_video
from musetalk_service.nets import fan
from musetalk_service.nets.s3fd import detect_faces
from musetalk_service.pipeline.blend import _parser_input, crop_square
from musetalk_service.pipeline.colour import yuv420p_planes, yuv420p_to_bgr
from musetalk_service.pipeline.faces import FaceLocator
from musetalk_service.pipeline.frames import DeviceFrame, DeviceFrames, DeviceFrameUploader
from musetalk_service.pipeline.latents import crop_faces
from musetalk_service.contract import LipsyncRequest
from musetalk_service.settings import FaceSettings


def _decoded(path, pix_fmt: str) -> np.ndarray:
    with VideoReader(path, probe_video(path), None, None, pix_fmt) as reader:
        return reader.read(8)


@pytest.fixture(scope="module")
def clip(make_video):
    return make_video(0.4, 25, (320, 240))


def test_uploaded_frames_are_the_planes_in_bt709_bgr_as_the_decoder_makes_them(clip):
    yuv = _decoded(clip, "yuv420p")
    frames = DeviceFrameUploader("cpu", 320, 240)(yuv)
    assert isinstance(frames, DeviceFrames) and frames.shape == (len(yuv), 240, 320, 3)
    for k, frame in enumerate(yuv):
        planes = [torch.from_numpy(p) for p in yuv420p_planes(frame, 320, 240)]
        assert torch.equal(frames.pixels[k], yuv420p_to_bgr(*planes))
    # ffmpeg's own BGR (BT.709, as media.decode asks) differs only by its filtered chroma
    # upsampling against our nearest one: BT.601 weights would move saturated colours by 10+.
    decoded = _decoded(clip, "bgr24").astype(int)
    difference = np.abs(frames.pixels.numpy().astype(int) - decoded)
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 8


def test_device_frames_index_like_the_numpy_batch():
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 40, 60, 3), dtype=np.uint8))
    frames = DeviceFrames(pixels)
    assert (len(frames), frames.shape, frames.ndim, frames.dtype) == (3, (3, 40, 60, 3), 4, np.uint8)
    tail = frames[1:]
    assert isinstance(tail, DeviceFrames) and torch.equal(tail.pixels, pixels[1:])
    frame = frames[2]
    assert isinstance(frame, DeviceFrame) and frame.shape == (40, 60, 3)
    region = frame[5:30, 50:80]  # clipped at the right edge, as numpy clips
    assert isinstance(region, np.ndarray) and np.array_equal(region, pixels[2].numpy()[5:30, 50:80])
    with pytest.raises(TypeError, match="pair of slices"):
        frame[5]
    with pytest.raises(ValueError, match="uint8"):
        DeviceFrames(pixels.float())


@pytest.fixture(scope="module")
def pair():
    """The same smooth, colourful pixels as a numpy batch and as `DeviceFrames`."""
    yy, xx = np.mgrid[0:240, 0:320]
    smooth = np.stack([128 + 100 * np.sin(xx / 13) * np.cos(yy / 9), xx * 255 / 320, yy * 255 / 240], -1)
    host = np.stack([smooth, smooth[::-1, ::-1]]).astype(np.uint8)
    return host, DeviceFrames(torch.from_numpy(host.copy()))


BOXES = [(100, 60, 220, 200), (-40, -30, 90, 110), (250, 150, 400, 300), (900, 700, 1000, 800)]
"""Inside, past the top-left corner, past the bottom-right corner, wholly outside the frame."""


def test_fan_crops_from_device_frames_equal_the_numpy_ones(pair):
    host, device = pair
    boxes = np.array(BOXES, dtype=np.float64) + 0.37  # sub-pixel spans
    index = np.array([0, 1, 0, 1])
    expected = fan.crop_faces(host, boxes, index)
    assert np.array_equal(fan.crop_faces(device, boxes, index), expected)
    assert expected[0].any() and not expected[3].any()  # a real crop, and one all border


def test_vae_crops_and_parsing_squares_from_device_frames_equal_the_numpy_ones(pair):
    host, device = pair
    clipped = [(max(x1, 0), max(y1, 0), min(x2, 320), min(y2, 240)) for x1, y1, x2, y2 in BOXES[:3]]
    rows = [0, 1, 1]
    assert np.array_equal(crop_faces([device[k] for k in rows], clipped), crop_faces([host[k] for k in rows], clipped))
    for k, box in zip(rows, clipped):
        square, _ = crop_square(box)
        assert np.array_equal(_parser_input(device[k], square), _parser_input(host[k], square))


def test_locating_faces_on_device_frames_gives_the_numpy_boxes(tiny_bundle, pair):
    host, device = pair
    # S3FD with every candidate kept, so the comparison is of many boxes, not of none.
    loose = {"score_threshold": 0.0, "candidate_threshold": 0.0}
    on_host = detect_faces(tiny_bundle.face_detector, list(host), **loose)
    on_device = detect_faces(tiny_bundle.face_detector, [device[k].pixels for k in range(2)], **loose)
    assert all(len(boxes) > 0 for boxes in on_host)
    for a, b in zip(on_host, on_device):
        np.testing.assert_array_equal(a, b)
    request = LipsyncRequest(video_path=Path("v.mp4"), audio_path=Path("a.wav"), output_path=Path("o.mp4"))
    settings = FaceSettings(detect_every=1)
    assert FaceLocator(tiny_bundle, request, settings).locate(device, [0, 1]) == FaceLocator(tiny_bundle, request, settings).locate(host, [0, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uploaded_frames_on_cuda_are_the_cpu_conversion(clip):
    yuv = _decoded(clip, "yuv420p")
    on_cpu = DeviceFrameUploader("cpu", 320, 240)(yuv)
    on_cuda = DeviceFrameUploader("cuda", 320, 240)(yuv)
    assert on_cuda.pixels.is_cuda and torch.equal(on_cuda.pixels.cpu(), on_cpu.pixels)
    assert np.array_equal(on_cuda[1][10:50, 20:90], on_cpu.pixels[1, 10:50, 20:90].numpy())
