"""Compose phase on the device: paste the generated faces into their frames, output yuv420p.

The numpy blend (`blend.FaceBlender.blend_batch`) costs a few ms of one CPU core per 1080p frame,
and a bgr24 input pipe halves one libx264 encoder's speed (the conversion inside ffmpeg and twice
the bytes: docs field notes, section 2). On a GPU both are a few kernels. `GpuComposer` blends the
faces with the same cached face-parsing masks as the numpy path (`FaceBlender.regions`, so both use
identical alpha) and hands `media.encode.VideoEncoder(input_pix_fmt='yuv420p')` BT.709
limited-range yuv420p, half the bytes of bgr24, in one of two ways:

- `compose_yuv`: yuv420p frames, the decoder's own planes (any BT.709 8-bit 4:2:0 video): only
  the tiles under the blend masks go to the device and back, converted to BGR, blended and
  converted back there; every other pixel stays as decoded, bit for bit, and never leaves host
  memory. A new video's masks are parsed from its frames on the device (`frames.DeviceFrames`).
- `compose`: BGR frames (a video whose planes can't pass through: 4:4:4, 10-bit, BT.601) are
  uploaded whole, blended and converted on the device, and come back as one yuv420p buffer.

The torch code runs on any device; on CPU it is the reference the tests compare, not a fast path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from musetalk_service.media.rawvideo import yuv420p_frame_bytes
from musetalk_service.pipeline.batch import Batch
from musetalk_service.pipeline.blend import ALPHA_SCALE, FaceBlender, PasteRegion, check_weights
from musetalk_service.pipeline.colour import bgr_to_yuv420p, yuv420p_planes, yuv420p_to_bgr
from musetalk_service.pipeline.frames import DeviceFrame
from musetalk_service.pipeline.plan import Compositing
from musetalk_service.pipeline.timing import PhaseTimer
from musetalk_service.contract import FaceBox


@dataclass(frozen=True)
class ComposedBatch:
    """One composed batch, in host memory that `GpuComposer` reuses: valid until its next call.

    `yuv`: uint8 `[n * yuv420p_frame_bytes(W, H)]`, the frames' yuv420p bytes back to back, for
    `VideoEncoder(..., input_pix_fmt='yuv420p').write`. `bgr`: the composite `[n, H, W, 3]`, when asked for.
    """

    yuv: np.ndarray
    bgr: np.ndarray | None


@dataclass(frozen=True)
class _Tile:
    """The part of a yuv420p frame one face is blended into: the paste region grown to even
    rows and columns (whole chroma samples)."""

    row: int
    face: int
    region: PasteRegion
    top: int
    bottom: int
    left: int
    right: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left

    @property
    def chroma(self) -> tuple[slice, slice]:
        """Rows and columns of the tile in the frame's U and V planes."""
        return slice(self.top // 2, (self.bottom + 1) // 2), slice(self.left // 2, (self.right + 1) // 2)


class GpuComposer:
    """Blends generated faces into frames on `device` and gives the frames as yuv420p.

    Masks come from `blender` (its cache, its parser, its fallback count): the regions and alpha
    are the numpy path's own, and only the face resize differs, by at most one level per pixel
    (cv2's fixed-point INTER_LINEAR against float bilinear with the same pixel-centre convention,
    upscaling and downscaling alike; about 1 pixel in 8 differs), so the composites differ by at
    most one level.

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
        weights: Sequence[float] | None = None,
    ) -> ComposedBatch:
        """Compose a batch of BGR frames and return it as yuv420p (and as BGR with `bgr=True`).

        `frames`: the original frames, uint8 BGR `[n, H, W, 3]`, only read, never written (a
        source frame output more than once needs no copy). `faces`: the generated faces, BGR
        `[k, 256, 256, 3]` uint8 (or float levels 0..255), on any device, one per box that is
        not None, in order (None when every box is None). `boxes`, `source_indices`: one per frame,
        as for `FaceBlender.blend_batch`; frames whose box is None pass through unchanged.
        `ready`: a CUDA event recorded after `faces` was produced; without one, a device tensor
        of faces is waited for by waiting for all work queued so far on the current stream.
        `weights`: one per frame, each face's alpha scaled by its frame's, as for `FaceBlender.blend_batch`.
        """
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [n, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        with_face = self._check_counts(len(frames), faces, boxes, source_indices, weights)
        with self._on_stream(faces, ready):
            # Inside the stream too: a BiSeNet pass for a missing mask need not queue behind the UNet.
            regions = self.blender.regions(frames.shape[1:], boxes, source_indices, frames.__getitem__)
            # Uploaded straight from the caller's pages: a pinned staging copy would cost the same
            # memcpy and hold a batch of frames (200 MB at 1080p) for good. On CPU (and for a
            # read-only array, which torch won't wrap), a copy to blend into.
            writable = frames if self._cuda and frames.flags.writeable else frames.copy()
            on_device = torch.from_numpy(writable).to(self.device)
            pasted = [(face, row) for face, row in enumerate(with_face) if regions[row] is not None]
            if pasted:
                device_faces, alphas = self._upload_faces_and_alphas(faces, [regions[row] for _, row in pasted])
                for (face, row), alpha in zip(pasted, alphas):
                    if weights is not None and weights[row] != 1:
                        alpha = alpha * float(np.float32(weights[row]))  # as the numpy blend scales it
                    region = regions[row]
                    original = on_device[row, region.top : region.bottom, region.left : region.right]
                    _blend_into(original, device_faces[face], boxes[row], region, alpha)
            yuv = bgr_to_yuv420p(on_device).view(-1)
            host_yuv = self._host_buffer("yuv", yuv.numel())
            host_yuv.copy_(yuv, non_blocking=True)
            composite = on_device.cpu().numpy() if bgr else None
        return ComposedBatch(host_yuv.numpy(), composite)

    def compose_yuv(
        self,
        frames: np.ndarray,
        width: int,
        height: int,
        faces: torch.Tensor | np.ndarray | None,
        boxes: Sequence[FaceBox | None],
        source_indices: Sequence[int],
        *,
        ready: torch.cuda.Event | None = None,
        frame_at: Callable[[int], np.ndarray | DeviceFrame] | None = None,
        weights: Sequence[float] | None = None,
    ) -> np.ndarray:
        """Blend the generated faces into yuv420p frames in place, and return `frames`.

        `frames`: uint8 `[n, yuv420p_frame_bytes(width, height)]`, BT.709 limited range, written
        in place (each row must be the caller's own, holding the original source pixels). Only
        the tile of each frame under its blend mask moves: converted to BGR there
        (`yuv420p_to_bgr`), blended as `compose` blends, converted back (`bgr_to_yuv420p`). A luma
        sample whose alpha is 0, and a chroma sample none of whose four pixels has alpha above 0,
        keep their decoded value exactly, so nothing outside the blended pixels changes by
        a level. `faces` ... `ready`: as for `compose`. `frame_at(k)`: frame k in BGR, where a
        parsing mask must be made from it (as for `FaceBlender.regions`); by default converted
        from its planes on the CPU, which suits the rare frame but not a new video's every mask.
        `weights`: as for `compose`. A frame with no box (no face, or not generated) is not touched.
        """
        if frames.dtype != np.uint8 or frames.ndim != 2 or frames.shape[1] != yuv420p_frame_bytes(width, height):
            raise ValueError(
                f"expected uint8 yuv420p frames [n, {yuv420p_frame_bytes(width, height)}] for {width}x{height}, "
                f"got {frames.dtype} {list(frames.shape)}"
            )
        with_face = self._check_counts(len(frames), faces, boxes, source_indices, weights)

        def converted(k: int) -> np.ndarray:
            planes = (torch.from_numpy(p) for p in yuv420p_planes(frames[k], width, height))
            return yuv420p_to_bgr(*planes).numpy()

        with self._on_stream(faces, ready):
            regions = self.blender.regions((height, width), boxes, source_indices, frame_at or converted)
            tiles = self._tiles(with_face, regions, width, height)
            if not tiles:
                return frames
            # All tiles in one padded batch, so the work is a fixed number of kernels per batch
            # rather than per face (one by one, kernel launches cost 1.6 ms of CPU a frame).
            rows = (max(t.shape[0] for t in tiles) + 1) & ~1
            cols = (max(t.shape[1] for t in tiles) + 1) & ~1
            host = _TileBatch(self._host_buffer("tiles", _TileBatch.nbytes(len(tiles), rows, cols)), len(tiles), rows, cols)
            host.masks.zero_()
            for k, tile in enumerate(tiles):
                for plane, padded in self._tile_planes(frames, host, k, tile, width, height):
                    np.copyto(padded, plane)
                h, w = tile.region.mask.shape
                r, c = tile.region.top - tile.top, tile.region.left - tile.left
                host.masks[k, r : r + h, c : c + w].numpy()[...] = tile.region.mask
            device = _TileBatch(host.buffer.to(self.device, non_blocking=True), len(tiles), rows, cols)
            device_faces = torch.as_tensor(faces).to(self.device, non_blocking=True)
            tile_weights = None if weights is None else [float(np.float32(weights[t.row])) for t in tiles]
            _blend_tiles(device, tiles, device_faces, boxes, tile_weights)
            if device.buffer is not host.buffer:  # on CPU the same buffer
                host.planes_bytes().copy_(device.planes_bytes(), non_blocking=True)
        for k, tile in enumerate(tiles):  # the stream is synchronised: the tiles are back in `host`
            for plane, padded in self._tile_planes(frames, host, k, tile, width, height):
                np.copyto(plane, padded)
        return frames

    @staticmethod
    def _check_counts(n: int, faces, boxes: Sequence[FaceBox | None], source_indices: Sequence[int], weights: Sequence[float] | None) -> list[int]:
        """The rows with a face; raises ValueError when the counts (or the weights) disagree."""
        if not n == len(boxes) == len(source_indices):
            raise ValueError(f"{n} frames, {len(boxes)} boxes, {len(source_indices)} source indices")
        check_weights(boxes, weights)
        with_face = [k for k, box in enumerate(boxes) if box is not None]
        if len(with_face) != (0 if faces is None else len(faces)):
            raise ValueError(f"{len(with_face)} boxes but {0 if faces is None else len(faces)} faces")
        return with_face

    def on_stream(self) -> contextlib.AbstractContextManager[None]:
        """Run a block on the composer's stream (synchronised at its end): the parse phase's
        BiSeNet passes, which then never queue behind the UNet on the default stream."""
        return self._on_stream(None, None)

    @contextlib.contextmanager
    def _on_stream(self, faces, ready: torch.cuda.Event | None):
        """Run the block on the composer's stream, after `faces` is ready; synchronise at the end."""
        if not self._cuda:
            with torch.inference_mode():
                yield
            return
        if ready is not None:
            self._stream.wait_event(ready)
        elif isinstance(faces, torch.Tensor) and faces.is_cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream), torch.inference_mode():
            yield
        self._stream.synchronize()

    def _upload_faces_and_alphas(self, faces, regions: list[PasteRegion]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The faces as float `[k, 3, 256, 256]` on the device, and each region's alpha `[h, w, 1]`
        (all masks in one upload, scaled on the device exactly as the numpy path does)."""
        device_faces = torch.as_tensor(faces).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        flat = np.concatenate([r.mask.ravel() for r in regions])
        alphas = torch.from_numpy(flat).to(self.device, non_blocking=True).float().mul_(float(ALPHA_SCALE))
        shapes = [(r.bottom - r.top, r.right - r.left, 1) for r in regions]
        return device_faces, [a.view(shape) for a, shape in zip(alphas.split([r.mask.size for r in regions]), shapes)]

    @staticmethod
    def _tiles(with_face: list[int], regions: list[PasteRegion | None], width: int, height: int) -> list[_Tile]:
        tiles = []
        for face, row in enumerate(with_face):
            region = regions[row]
            if region is not None:
                tiles.append(_Tile(
                    row, face, region,
                    top=region.top - region.top % 2, bottom=min(height, region.bottom + region.bottom % 2),
                    left=region.left - region.left % 2, right=min(width, region.right + region.right % 2),
                ))  # fmt: skip
        return tiles

    @staticmethod
    def _tile_planes(frames: np.ndarray, batch: _TileBatch, k: int, tile: _Tile, width: int, height: int):
        """(frame plane, padded slot) pairs of tile k's Y, U and V, as numpy views of both."""
        y, u, v = yuv420p_planes(frames[tile.row], width, height)
        rows, cols = tile.chroma
        in_frame = [y[tile.top : tile.bottom, tile.left : tile.right], u[rows, cols], v[rows, cols]]
        return zip(in_frame, (padded.numpy() for padded in batch.tile_planes(k, tile)))

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


def _blend_into(original: torch.Tensor, face: torch.Tensor, box: FaceBox, region: PasteRegion, alpha: torch.Tensor) -> None:
    """Blend `face` (float `[3, 256, 256]`), resized to `box`, into `original`, the BGR uint8
    pixels of `region` (`[h, w, 3]`, a view written in place), with `alpha` `[h, w, 1]`."""
    x1, y1, x2, y2 = box
    resized = F.interpolate(face[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
    generated = resized[:, region.top - y1 : region.bottom - y1, region.left - x1 : region.right - x1]
    original.copy_(_blended_levels(generated.permute(1, 2, 0), original, alpha))


def _blended_levels(generated: torch.Tensor, original: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """`generated` (float levels, `[..., 3]`, overwritten) rounded to levels as cv2 hands the numpy
    path a uint8 face, blended over `original` (uint8) with `alpha` in the numpy path's float32
    steps and order, plus 0.5: the truncating cast to uint8 that follows rounds."""
    base = original.float()
    return generated.round_().sub_(base).mul_(alpha).add_(base).add_(0.5)


class _TileBatch:
    """Views of one buffer holding a batch of tiles padded to `rows` x `cols` (both even): Y
    `[n, rows, cols]`, U and V `[n, rows / 2, cols / 2]`, then the blend masks `[n, rows, cols]`
    (uint8, zero outside each region), each tile in the top-left corner of its slot."""

    def __init__(self, buffer: torch.Tensor, n: int, rows: int, cols: int):
        self.buffer = buffer
        luma, chroma = n * rows * cols, n * rows * cols // 4
        y, u, v, masks = buffer.split([luma, chroma, chroma, luma])
        self.y, self.masks = y.view(n, rows, cols), masks.view(n, rows, cols)
        self.u, self.v = u.view(n, rows // 2, cols // 2), v.view(n, rows // 2, cols // 2)
        self._planes_bytes = luma + 2 * chroma

    @staticmethod
    def nbytes(n: int, rows: int, cols: int) -> int:
        return n * rows * cols * 3 // 2 + n * rows * cols

    def planes_bytes(self) -> torch.Tensor:
        """The Y, U and V part of the buffer (what goes back to the frames)."""
        return self.buffer[: self._planes_bytes]

    def tile_planes(self, k: int, tile: _Tile) -> list[torch.Tensor]:
        """Tile k's Y `[h, w]`, U and V `[ceil(h/2), ceil(w/2)]` within its padded slot."""
        h, w = tile.shape
        ch, cw = (h + 1) // 2, (w + 1) // 2
        return [self.y[k, :h, :w], self.u[k, :ch, :cw], self.v[k, :ch, :cw]]


def _blend_tiles(batch: _TileBatch, tiles: list[_Tile], faces: torch.Tensor, boxes: Sequence[FaceBox | None], weights: list[float] | None) -> None:
    """Blend each tile's face into its planes in `batch`, in place (see `GpuComposer.compose_yuv`),
    its alpha scaled by its weight in `weights` (None: all 1).

    The faces are resized with `grid_sample` rather than `F.interpolate`, one size for the whole
    batch: a sampling grid per tile puts each tile pixel where interpolate would (half-pixel
    centres, scale = 256 / box side, clamped at the border), so the result is the same bilinear
    resize, to float rounding, as `_blend_into`'s.
    """
    n, rows, cols = batch.y.shape
    device = batch.y.device
    bgr = yuv420p_to_bgr(batch.y, batch.u, batch.v)
    # Per tile: the tile's origin relative to its box, and the box's size.
    params = [(t.top - boxes[t.row][1], boxes[t.row][3] - boxes[t.row][1], t.left - boxes[t.row][0], boxes[t.row][2] - boxes[t.row][0]) for t in tiles]
    oy, bh, ox, bw = torch.tensor(params, dtype=torch.float32).to(device, non_blocking=True).unbind(1)
    gy = (torch.arange(rows, device=device)[None] + oy[:, None] + 0.5).mul_(2 / bh[:, None]).sub_(1)
    gx = (torch.arange(cols, device=device)[None] + ox[:, None] + 0.5).mul_(2 / bw[:, None]).sub_(1)
    grid = torch.stack([gx[:, None, :].expand(n, rows, cols), gy[:, :, None].expand(n, rows, cols)], dim=-1)
    chosen = faces[[t.face for t in tiles]].permute(0, 3, 1, 2).float()
    generated = F.grid_sample(chosen, grid, mode="bilinear", padding_mode="border", align_corners=False)
    alpha = batch.masks.float().mul_(float(ALPHA_SCALE))[..., None]
    if weights is not None and any(w != 1 for w in weights):
        alpha.mul_(torch.tensor(weights, dtype=torch.float32).to(device, non_blocking=True).view(n, 1, 1, 1))
    blended = _blended_levels(generated.permute(0, 2, 3, 1), bgr, alpha).to(torch.uint8)
    for k, tile in enumerate(tiles):
        # An odd side (at an odd frame's edge): its 2x2 blocks repeat the last row/column, as
        # `bgr_to_yuv420p` does for a whole frame.
        h, w = tile.shape
        if h % 2:
            blended[k, h, : w + 1] = blended[k, h - 1, : w + 1]
        if w % 2:
            blended[k, : h + 1, w] = blended[k, : h + 1, w - 1]
    new_y, new_u, new_v = bgr_to_yuv420p(blended).split([rows * cols, rows * cols // 4, rows * cols // 4], dim=1)
    changed = batch.masks > 0
    batch.y.copy_(torch.where(changed, new_y.view(n, rows, cols), batch.y))
    # A chroma sample changes when any pixel of its 2x2 block does.
    block = changed.view(n, rows // 2, 2, cols // 2, 2).any(dim=4).any(dim=2)
    batch.u.copy_(torch.where(block, new_u.view(batch.u.shape), batch.u))
    batch.v.copy_(torch.where(block, new_v.view(batch.v.shape), batch.v))


# --- the compose phase of a request: one compositor, chosen by the plan ------------------------------


class Compositor(Protocol):
    """Pastes a batch's generated faces into its frames and gives what the encoder takes."""

    def compose(self, batch: Batch, boxes: list[FaceBox | None]) -> np.ndarray:
        """The batch's frames with the faces of `batch.rows` pasted at `boxes` (one per output
        frame, None where nothing is pasted), as the plan's `encode_pix_fmt`."""
        ...

    def on_stream(self) -> contextlib.AbstractContextManager[None]:
        """Where work beside the compositor's own runs (the parse phase): its stream, if any."""
        ...


class NumpyCompositor:
    """The CPU blend (`FaceBlender.blend_batch`) into BGR frames, in place; BGR out."""

    def __init__(self, blender: FaceBlender):
        self.blender = blender

    def compose(self, batch: Batch, boxes: list[FaceBox | None]) -> np.ndarray:
        rows = batch.rows
        if rows:
            self.blender.blend_batch(
                [batch.frames[k] for k in rows], batch.faces, [boxes[k] for k in rows], [batch.sources[k] for k in rows],
                weights=[batch.weights[k] for k in rows],
            )  # fmt: skip
        return batch.frames

    def on_stream(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class DeviceBgrCompositor:
    """BGR frames uploaded whole, composed and converted on the device (`GpuComposer.compose`); yuv420p out."""

    def __init__(self, composer: GpuComposer):
        self.composer = composer

    def compose(self, batch: Batch, boxes: list[FaceBox | None]) -> np.ndarray:
        return self.composer.compose(batch.frames, batch.faces, boxes, batch.sources, ready=batch.ready, weights=batch.weights).yuv

    def on_stream(self) -> contextlib.AbstractContextManager[None]:
        return self.composer.on_stream()


class DeviceYuvCompositor:
    """The decoder's yuv420p planes, only the tiles under the masks blended (`GpuComposer.compose_yuv`)."""

    def __init__(self, composer: GpuComposer, width: int, height: int):
        self.composer = composer
        self.width = width
        self.height = height

    def compose(self, batch: Batch, boxes: list[FaceBox | None]) -> np.ndarray:
        frame_at = None if batch.bgr is None else batch.bgr.__getitem__
        return self.composer.compose_yuv(
            batch.frames, self.width, self.height, batch.faces, boxes, batch.sources,
            ready=batch.ready, frame_at=frame_at, weights=batch.weights,
        )  # fmt: skip

    def on_stream(self) -> contextlib.AbstractContextManager[None]:
        return self.composer.on_stream()


def make_compositor(kind: Compositing, blender: FaceBlender, device: torch.device | str, width: int, height: int) -> Compositor:
    """The plan's compositor (`plan.RequestPlan.compositing`) over `blender`'s masks."""
    if kind == "numpy":
        return NumpyCompositor(blender)
    composer = GpuComposer(blender, device)
    return DeviceYuvCompositor(composer, width, height) if kind == "device_yuv" else DeviceBgrCompositor(composer)


class Encoder(Protocol):
    def write(self, frames: np.ndarray) -> None: ...


class ComposeStage:
    """Compose and encode phases (the writer thread): each output batch composed and handed to
    the encoder, in order; progress reported per batch. A batch of source frames prepared only
    has nothing to compose."""

    def __init__(self, compositor: Compositor, boxes: Sequence[FaceBox | None], encoder: Encoder, timer: PhaseTimer, progress: Callable[[str, int, int], None], total: int):
        """`boxes`: every source frame's face box (a prepared avatar's, or a new video's as located)."""
        self.compositor = compositor
        self.boxes = boxes
        self.encoder = encoder
        self.timer = timer
        self.progress = progress
        self.total = total

    def run(self, batch: Batch) -> None:
        if not batch.indices:
            return
        # The frames generated keep their boxes; the others (no face, or silent) have none.
        made = set(batch.rows)
        boxes = [self.boxes[j] if k in made else None for k, j in enumerate(batch.sources)]
        with self.timer.phase("blend"):
            out = self.compositor.compose(batch, boxes)
        with self.timer.phase("encode"):
            self.encoder.write(out)
        self.progress("frames", batch.indices[-1] + 1, self.total)
