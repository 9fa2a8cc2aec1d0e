"""BT.709 limited-range colour: BGR frames to the yuv420p planes the encoder takes, and back.

The compose phase converts its output with these (`compose`), and the tiles of a prepared
avatar's frames both ways (`compose.GpuComposer.compose_yuv`); a new video's frames are decoded
as yuv420p and made BGR on the device for the face phase (`frames.DeviceFrames`). Torch code, on
any device: on CPU it is the reference the tests compare.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _bt709_rows() -> tuple[tuple[tuple[float, float, float], float], ...]:
    """(B, G, R) weights and offset of Y, U and V: BT.709, limited ("tv") range, 8-bit levels."""
    kr, kb = 0.2126, 0.0722
    luma = (kb, 1 - kr - kb, kr)
    y = tuple(219 / 255 * k for k in luma)
    u = tuple(224 / 255 * ((c == 0) - k) / (2 * (1 - kb)) for c, k in enumerate(luma))
    v = tuple(224 / 255 * ((c == 2) - k) / (2 * (1 - kr)) for c, k in enumerate(luma))
    return (y, 16.0), (u, 128.0), (v, 128.0)


_Y, _U, _V = _bt709_rows()


def _bt709_inverse() -> tuple[tuple[float, float, float], ...]:
    """Weights of (Y - 16, U - 128, V - 128) in B, G and R: the inverse of the rows above."""
    forward = np.array([row for row, _ in (_Y, _U, _V)], dtype=np.float64)  # [YUV, BGR]
    inverse = np.linalg.inv(forward)  # [BGR, YUV]
    return tuple(tuple(float(w) for w in row) for row in inverse)


_BGR_FROM_YUV = _bt709_inverse()

_CHUNK_PIXELS = 1 << 23
"""Pixels converted at once (four 1080p frames): bounds the float32 temporaries to about 0.25 GB
whatever the batch size, while keeping kernel launches per frame few."""


def bgr_to_yuv420p(frames: torch.Tensor) -> torch.Tensor:
    """BGR uint8 frames `[n, H, W, 3]` -> yuv420p `[n, yuv420p_frame_bytes(W, H)]` uint8, same device.

    BT.709 limited range (Y = 16 + 219 * luma, chroma 128 +- 112), each value rounded to the
    nearest level. Chroma is computed from the mean of each 2x2 block (fewer pixels at an odd
    right or bottom edge, where the encoder crops that column/row away anyway). Each frame's bytes
    are its Y, U and V planes, as ffmpeg's rawvideo yuv420p.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [n, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    n, h, w, _ = frames.shape
    ch, cw = (h + 1) // 2, (w + 1) // 2
    luma, chroma = h * w, ch * cw
    out = torch.empty((n, luma + 2 * chroma), dtype=torch.uint8, device=frames.device)
    step = max(1, _CHUNK_PIXELS // luma)
    for start in range(0, n, step):
        bgr = frames[start : start + step].float()
        part = out[start : start + step]
        part[:, :luma].view(-1, h, w).copy_(_levels(bgr.unbind(-1), _Y))
        # An odd edge repeats its last row/column: a partial block averages the pixels it has.
        if h % 2:
            bgr = torch.cat([bgr, bgr[:, -1:]], dim=1)
        if w % 2:
            bgr = torch.cat([bgr, bgr[:, :, -1:]], dim=2)
        # Sums of strided halves rather than avg_pool2d: faster on CPU (its channels-last kernel is
        # slow), and the edge rule is the explicit one above rather than ceil_mode's divisor.
        blocks = bgr.view(-1, ch, 2, cw, 2, 3)
        rows = blocks[:, :, 0] + blocks[:, :, 1]
        means = (rows[:, :, :, 0] + rows[:, :, :, 1]).mul_(0.25).unbind(-1)
        part[:, luma : luma + chroma].view(-1, ch, cw).copy_(_levels(means, _U))
        part[:, luma + chroma :].view(-1, ch, cw).copy_(_levels(means, _V))
    return out


def yuv420p_to_bgr(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """yuv420p planes -> BGR uint8 `[..., h, w, 3]`, same device: the inverse of `bgr_to_yuv420p`.

    `y`: uint8 `[..., h, w]`; `u`, `v`: `[..., ceil(h/2), ceil(w/2)]`, each sample standing for its
    2x2 block (nearest upsampling, the blocks `bgr_to_yuv420p` averages over). BT.709 limited
    range, rounded to the nearest level and clamped to 0..255 (a subsampled chroma next to a sharp
    edge can fall outside the RGB cube). Element-wise, for the reason `_levels` gives.
    """
    h, w = y.shape[-2:]

    def upsampled(plane: torch.Tensor) -> torch.Tensor:
        return plane.float().sub_(128).repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :h, :w]

    luma, pb, pr = y.float().sub_(16), upsampled(u), upsampled(v)
    channels = [
        (luma * wy).add_(pb, alpha=wu).add_(pr, alpha=wv).add_(0.5).clamp_(0, 255) for wy, wu, wv in _BGR_FROM_YUV
    ]
    return torch.stack(channels, dim=-1).to(torch.uint8)  # the truncating cast after +0.5 rounds


def yuv420p_planes(frame: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the Y `[H, W]`, U and V `[ceil(H/2), ceil(W/2)]` planes of one frame's yuv420p bytes."""
    ch, cw = (height + 1) // 2, (width + 1) // 2
    luma, chroma = width * height, ch * cw
    return (
        frame[:luma].reshape(height, width),
        frame[luma : luma + chroma].reshape(ch, cw),
        frame[luma + chroma : luma + 2 * chroma].reshape(ch, cw),
    )


def _levels(bgr: Sequence[torch.Tensor], row: tuple[tuple[float, float, float], float]) -> torch.Tensor:
    """One plane as float32 values + 0.5, ready for a truncating copy into uint8 (= round half up).

    Element-wise on purpose: a matmul could run in TF32 on CUDA, whose 10-bit mantissa would flip
    roundings. Limited range keeps every value in [16, 240], so no clamping is needed.
    """
    (wb, wg, wr), offset = row
    b, g, r = bgr
    return (b * wb).add_(g, alpha=wg).add_(r, alpha=wr).add_(offset + 0.5)


def yuv420p_frames_to_bgr(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """yuv420p frames `[n, yuv420p_frame_bytes(width, height)]` uint8 -> BGR `[n, height, width, 3]`
    uint8 on the same device, as `yuv420p_to_bgr` converts each; a few frames at a time, so the
    float temporaries stay bounded whatever the batch size."""
    ch, cw = (height + 1) // 2, (width + 1) // 2
    luma, chroma = width * height, ch * cw
    if frames.dtype != torch.uint8 or frames.ndim != 2 or frames.shape[1] != luma + 2 * chroma:
        raise ValueError(f"expected uint8 yuv420p frames [n, {luma + 2 * chroma}] for {width}x{height}, got {frames.dtype} {list(frames.shape)}")
    out = torch.empty((len(frames), height, width, 3), dtype=torch.uint8, device=frames.device)
    step = max(1, _CHUNK_PIXELS // luma)
    for start in range(0, len(frames), step):
        part = frames[start : start + step]
        y = part[:, :luma].view(-1, height, width)
        u = part[:, luma : luma + chroma].view(-1, ch, cw)
        v = part[:, luma + chroma :].view(-1, ch, cw)
        out[start : start + step] = yuv420p_to_bgr(y, u, v)
    return out
