"""Compose phase on the device: paste the generated faces into their frames and convert to yuv420p.

The numpy blend (`blend.FaceBlender.blend_batch`) costs a few ms of one CPU core per 1080p frame,
and a bgr24 input pipe halves one libx264 encoder's speed (the conversion inside ffmpeg and twice
the bytes: docs field notes, section 2). On a GPU both are a few kernels: `GpuComposer` uploads
each batch of frames once, blends the faces with the same cached face-parsing masks as the numpy
path (`FaceBlender.regions`, so both use identical alpha), converts to BT.709 limited-range
yuv420p and downloads one buffer, half the bytes of bgr24, that
`media.encode.VideoEncoder(input_pix_fmt='yuv420p')` writes to ffmpeg as it is.

The torch code runs on any device; on CPU it is the reference the tests compare, not a fast path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from musetalk_service.pipeline.blend import ALPHA_SCALE, FaceBlender, PasteRegion
from musetalk_service.pipeline.request import FaceBox


def _bt709_rows() -> tuple[tuple[tuple[float, float, float], float], ...]:
    """(B, G, R) weights and offset of Y, U and V: BT.709, limited ("tv") range, 8-bit levels."""
    kr, kb = 0.2126, 0.0722
    luma = (kb, 1 - kr - kb, kr)
    y = tuple(219 / 255 * k for k in luma)
    u = tuple(224 / 255 * ((c == 0) - k) / (2 * (1 - kb)) for c, k in enumerate(luma))
    v = tuple(224 / 255 * ((c == 2) - k) / (2 * (1 - kr)) for c, k in enumerate(luma))
    return (y, 16.0), (u, 128.0), (v, 128.0)


_Y, _U, _V = _bt709_rows()

_CHUNK_PIXELS = 1 << 23
"""Pixels converted at once (four 1080p frames): bounds the float32 temporaries to about 0.25 GB
whatever the batch size, while keeping kernel launches per frame few."""


def yuv420p_frame_bytes(width: int, height: int) -> int:
    """Bytes of one yuv420p frame as ffmpeg's rawvideo lays it out: Y, then U and V planes of
    ceil(width / 2) x ceil(height / 2)."""
    return width * height + 2 * ((width + 1) // 2) * ((height + 1) // 2)


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


def _levels(bgr: Sequence[torch.Tensor], row: tuple[tuple[float, float, float], float]) -> torch.Tensor:
    """One plane as float32 values + 0.5, ready for a truncating copy into uint8 (= round half up).

    Element-wise on purpose: a matmul could run in TF32 on CUDA, whose 10-bit mantissa would flip
    roundings. Limited range keeps every value in [16, 240], so no clamping is needed.
    """
    (wb, wg, wr), offset = row
    b, g, r = bgr
    return (b * wb).add_(g, alpha=wg).add_(r, alpha=wr).add_(offset + 0.5)


@dataclass(frozen=True)
class ComposedBatch:
    """One composed batch, in host memory that `GpuComposer` reuses: valid until its next call.

    `yuv`: uint8 `[n * yuv420p_frame_bytes(W, H)]`, the frames' yuv420p bytes back to back, for
    `VideoEncoder(..., input_pix_fmt='yuv420p').write`. `bgr`: the composite `[n, H, W, 3]`, when asked for.
    """

    yuv: np.ndarray
    bgr: np.ndarray | None


class GpuComposer:
    """Blends generated faces into frames on `device` and converts them to yuv420p there.

    Masks come from `blender` (its cache, its parser, its fallback count): the regions and alpha
    are the numpy path's own, and only the face resize differs, by at most one level per pixel
    (cv2's fixed-point INTER_LINEAR against float bilinear with the same pixel-centre convention,
    upscaling and downscaling alike; about 1 pixel in 8 differs), so the composites differ by at
    most one level. The caller's frames are only read, never written, so a source frame output
    more than once needs no copy.

    On CUDA the work runs on the composer's own stream, so it overlaps the UNet on the default
    stream; host buffers are pinned for asynchronous copies and reused from call to call.
    """

    def __init__(self, blender: FaceBlender, device: torch.device | str):
        self.blender = blender
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._host: dict[str, torch.Tensor] = {}

    def compose(
        self,
        frames: np.ndarray,
        faces: torch.Tensor | np.ndarray | None,
        boxes: Sequence[FaceBox | None],
        source_indices: Sequence[int],
        *,
        ready: torch.cuda.Event | None = None,
        bgr: bool = False,
    ) -> ComposedBatch:
        """Compose a batch and return it as yuv420p (and as BGR with `bgr=True`).

        `frames`: the original frames, uint8 BGR `[n, H, W, 3]`. `faces`: the generated faces,
        BGR `[k, 256, 256, 3]` uint8 (or float levels 0..255), on any device, one per box that is
        not None, in order (None when every box is None). `boxes`, `source_indices`: one per frame,
        as for `FaceBlender.blend_batch`; frames whose box is None pass through unchanged.
        `ready`: a CUDA event recorded after `faces` was produced; without one, a device tensor
        of faces is waited for by waiting for all work queued so far on the current stream.
        """
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [n, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        if not len(frames) == len(boxes) == len(source_indices):
            raise ValueError(f"{len(frames)} frames, {len(boxes)} boxes, {len(source_indices)} source indices")
        with_face = [k for k, box in enumerate(boxes) if box is not None]
        if len(with_face) != (0 if faces is None else len(faces)):
            raise ValueError(f"{len(with_face)} boxes but {0 if faces is None else len(faces)} faces")
        if self._cuda:
            if ready is not None:
                self._stream.wait_event(ready)
            elif isinstance(faces, torch.Tensor) and faces.is_cuda:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
        context = torch.cuda.stream(self._stream) if self._cuda else contextlib.nullcontext()
        with context, torch.inference_mode():
            # Inside the stream too: a BiSeNet pass for new masks need not queue behind the UNet.
            regions = self.blender.regions(frames, boxes, source_indices)
            staged = self._host_buffer("frames", frames.nbytes).view(frames.shape)
            np.copyto(staged.numpy(), frames)
            on_device = staged.to(self.device, non_blocking=True)  # on CPU: the staging buffer itself
            if with_face:
                self._paste_all(on_device, faces, with_face, boxes, regions)
            yuv = bgr_to_yuv420p(on_device).view(-1)
            host_yuv = self._host_buffer("yuv", yuv.numel())
            host_yuv.copy_(yuv, non_blocking=True)
            composite = on_device.cpu().numpy() if bgr else None
        if self._cuda:
            self._stream.synchronize()
        return ComposedBatch(host_yuv.numpy(), composite)

    def _paste_all(
        self,
        frames: torch.Tensor,
        faces: torch.Tensor | np.ndarray,
        rows: list[int],
        boxes: Sequence[FaceBox | None],
        regions: list[PasteRegion | None],
    ) -> None:
        """Blend face j into `frames[rows[j]]` in place, where that frame's region says."""
        present = [regions[row] for row in rows if regions[row] is not None]
        if not present:
            return
        faces = torch.as_tensor(faces).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        # All masks in one upload, scaled to alpha on the device exactly as the numpy path does.
        flat = np.concatenate([r.mask.ravel() for r in present])
        alphas = torch.from_numpy(flat).to(self.device, non_blocking=True).float().mul_(float(ALPHA_SCALE))
        alphas = iter(alphas.split([r.mask.size for r in present]))
        for face, row in zip(faces, rows):
            region, box = regions[row], boxes[row]
            if region is None:
                continue
            alpha = next(alphas).view(region.bottom - region.top, region.right - region.left, 1)
            x1, y1, x2, y2 = box
            resized = F.interpolate(face[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
            # cv2 hands the numpy path a uint8 face: round to levels as it does.
            generated = resized[:, region.top - y1 : region.bottom - y1, region.left - x1 : region.right - x1]
            generated = generated.permute(1, 2, 0).round()
            original = frames[row, region.top : region.bottom, region.left : region.right]
            base = original.float()
            # The numpy path's float32 steps in its order; +0.5 then the truncating copy rounds.
            original.copy_(generated.sub_(base).mul_(alpha).add_(base).add_(0.5))

    def _host_buffer(self, name: str, nbytes: int) -> torch.Tensor:
        """A reusable uint8 host buffer of `nbytes` (pinned on CUDA), grown when too small.

        Reuse is safe: every call ends by synchronising the stream, so no copy is still reading
        or writing a buffer when the next call refills it.
        """
        buffer = self._host.get(name)
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._cuda)
            self._host[name] = buffer
        return buffer[:nbytes]
