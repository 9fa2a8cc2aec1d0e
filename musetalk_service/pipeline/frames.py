"""A new video's frames on the GPU: decoded as yuv420p, made BGR there, read back where the CPU needs them.

On a new video the face phase (S3FD, FAN), the VAE's face crops and the parsing masks read BGR
frames. Decoding to bgr24 costs ffmpeg a conversion and doubles the bytes through the decoder's
pipe, and that pipe bounded a new video's requests on the H100 (2026-11-24, 1080p: one Python
thread takes about 1.75 GB/s from a pipe, 277 bgr24 frames a second against 577 yuv420p). So on a
GPU the decoder hands over its yuv420p planes, one upload per batch makes them BGR on the device
(`DeviceFrameUploader`), S3FD reads them there, and only the regions the CPU code works on come
back: FAN's and the VAE's face crops and the parsing squares, a few percent of each frame. Host
memory then holds each batch as yuv420p only, half the bytes of BGR.

`DeviceFrames` is indexed like the `[n, H, W, 3]` numpy batch it stands for: `len`, `shape`,
`frames[a:b]` (a batch again) and `frames[k]` (a `DeviceFrame`, whose 2-D slice `frame[y1:y2,
x1:x2]` is that region as a new host numpy array). Code written for numpy frames that reads them
only through such slices runs on either.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from musetalk_service.pipeline.colour import yuv420p_frames_to_bgr


class DeviceFrame:
    """One BGR frame `[H, W, 3]` on the device; `frame[rows, cols]` reads a region back (see the module docstring)."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, pixels: torch.Tensor, read_stream: torch.cuda.Stream | None):
        self.pixels = pixels
        """The frame itself, uint8 `[H, W, 3]` on the device (what S3FD reads)."""
        self._read_stream = read_stream

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        """The region `[rows, cols]` (two slices, clipped to the frame as numpy clips them) in host memory."""
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
            raise TypeError(f"a device frame is read by a [rows, cols] pair of slices, got {key!r}")
        # On a stream of its own: on the default stream the copy would queue behind the UNet.
        context = torch.cuda.stream(self._read_stream) if self._read_stream is not None else contextlib.nullcontext()
        with context:
            return self.pixels[key].cpu().numpy()


class DeviceFrames:
    """A batch of BGR frames `[n, H, W, 3]` on the device (see the module docstring)."""

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, pixels: torch.Tensor, read_stream: torch.cuda.Stream | None = None):
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [n, H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
        self.pixels = pixels
        self._read_stream = read_stream

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.pixels.shape)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, key: int | slice) -> DeviceFrame | DeviceFrames:
        if isinstance(key, slice):
            return DeviceFrames(self.pixels[key], self._read_stream)
        return DeviceFrame(self.pixels[key], self._read_stream)


class DeviceFrameUploader:
    """Makes `DeviceFrames` of yuv420p batches (`media.decode.VideoReader(pix_fmt='yuv420p')`
    frames of a BT.709 limited-range video) on `device`, for one request.

    The upload and conversion run on a stream of their own and are waited for, so the frames are
    ready for whichever stream reads them next; regions are read back on another stream, so a read
    never queues behind the next batch's conversion.
    """

    def __init__(self, device: torch.device | str, width: int, height: int):
        self.device = torch.device(device)
        self.width = width
        self.height = height
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._read_stream = torch.cuda.Stream(self.device) if cuda else None

    def __call__(self, yuv: np.ndarray) -> DeviceFrames:
        """The BGR frames of yuv420p frames `[n, yuv420p_frame_bytes(W, H)]` uint8 (host memory)."""
        if self._stream is None:
            return DeviceFrames(yuv420p_frames_to_bgr(torch.from_numpy(yuv).to(self.device), self.width, self.height))
        with torch.cuda.stream(self._stream):
            pixels = yuv420p_frames_to_bgr(torch.from_numpy(yuv).to(self.device), self.width, self.height)
        self._stream.synchronize()
        return DeviceFrames(pixels, self._read_stream)
