"""Blend phase: paste generated faces back into their frames through a face-parsing mask.

The mask (MuseTalk 1.5 spec, section 7) comes from BiSeNet run on a square 1.5x larger than the
face box, cut from the original frame. It keeps the chosen face classes inside the box and in the
lower half of the square only, and its edges are Gaussian-blurred. It depends only on the source
frame and its box, so `FaceBlender` computes it for one source frame in every `mask_every` and
reuses it in between; the blend itself is a few vectorised numpy operations over the face box.

Everything is BGR uint8 numpy, with no full-frame copies. The parser reads a frame only through
its `frame[rows, cols]` slice, so a new video's frames may also be `frames.DeviceFrames` on the GPU.
The parser's 512x512 input and the mask's resize back to the square are PIL's (`Image.resize`), as
the official code resizes them: OpenCV's kernels are not PIL's (PIL widens its filter's support with
the downscale factor, cv2's cubic and linear do not), and with them the mask's feathered edge was up
to 25 levels off the official one. Pillow's resize releases the GIL, so masks still run on threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from musetalk_service.parallel import for_each_index
from musetalk_service.pipeline.frames import DeviceFrame
from musetalk_service.contract import FaceBox, LipsyncRequest
from musetalk_service.settings import ParsingMode

logger = logging.getLogger(__name__)

MaskEntry = tuple[np.ndarray, int, int, int]
"""A cached mask as plain data: (values, top, left, side), see `_CachedMask`."""

Square = tuple[int, int, int, int]
"""(x1, y1, x2, y2) of the square around a face box; it may extend past the frame."""

EXPAND = 1.5
"""Half-side of the square = 1.5 x half the longer side of the box."""
BLUR_FRACTION = 0.05
"""Gaussian kernel of about 5 % of the square's side: the official offline blend (`get_image`),
which is the quality reference. The realtime path uses 10 %, a softer seam that lets more of the
original mouth show through; we keep the sharper one the offline results were judged with."""
PARSING_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARSE_BATCH = 8
"""Squares per BiSeNet forward pass (8 x 3 x 512 x 512 inputs)."""
ALPHA_SCALE = np.float32(1 / 255)
"""alpha = mask * ALPHA_SCALE in float32, in this numpy blend and in `compose.GpuComposer` alike."""

SKIN, NOSE, NECK = 1, 10, 14
MOUTH_AND_LIPS = (11, 12, 13)
"""Classes always blended in every mode: mouth, upper lip, lower lip."""
MODE_CLASSES: dict[str, tuple[int, ...]] = {
    "raw": (SKIN, *MOUTH_AND_LIPS),
    "neck": (SKIN, *MOUTH_AND_LIPS, NECK),
}
"""The class sets of the plain modes; `jaw` is a procedure, see `parsing_region`."""


def _jaw_dilation_kernel() -> np.ndarray:
    # Rows 10-20: a cone widening from 1 to 21 px; rows 21-32: a 21 px bar. Anchored at the centre,
    # a skin pixel spreads 16 px up at full width and 6 px down in a narrowing cone, which grows
    # the jaw region towards the mouth rather than down the neck.
    kernel = np.zeros((33, 33), dtype=np.uint8)
    for row in range(10, 21):
        half = row - 10
        kernel[row, 16 - half : 16 + half + 1] = 1
    kernel[21:, 6:27] = 1
    return kernel


_JAW_DILATE = _jaw_dilation_kernel()
_JAW_ERODE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))


def crop_square(box: FaceBox, expand: float = EXPAND) -> tuple[Square, int]:
    """The square around `box` used for parsing and blending, and its half-side s.

    Centre = integer centre of the box, s = int(max(w, h) // 2 * expand); the square is
    (xc - s, yc - s, xc + s, yc + s) and may extend outside the frame.
    """
    x1, y1, x2, y2 = box
    xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
    s = int(max(x2 - x1, y2 - y1) // 2 * expand)
    return (xc - s, yc - s, xc + s, yc + s), s


def parsing_region(
    labels: np.ndarray, mode: ParsingMode, left_cheek_width: int = 90, right_cheek_width: int = 90
) -> np.ndarray:
    """Binary 0/255 map of the pixels to blend, from a 512x512 BiSeNet label map.

    raw: skin, mouth and lips; neck: raw plus neck. jaw (the v1.5 default): skin dilated upward
    (towards the mouth) in the central band between the cheek columns and eroded by about 34 px
    per side in the outer cheek columns, so the paste follows the jaw without smearing the cheeks;
    nose pixels are excluded and mouth and lips are always kept.
    """
    if mode in MODE_CLASSES:
        return np.isin(labels, MODE_CLASSES[mode]).astype(np.uint8) * 255
    if mode != "jaw":
        raise ValueError(f"unknown parsing mode {mode!r}")
    skin = (labels == SKIN).astype(np.uint8) * 255
    dilated = cv2.dilate(skin, _JAW_DILATE)
    eroded = cv2.erode(dilated, _JAW_ERODE, iterations=2)
    centre = PARSING_SIZE // 2
    cheek = np.zeros(PARSING_SIZE, dtype=bool)
    # Inclusive column bounds, as the official cv2.rectangle draws them.
    cheek[: max(0, centre - left_cheek_width + 1)] = True
    cheek[centre + right_cheek_width :] = True
    region = np.where(cheek[None, :], eroded, dilated) > 0
    keep = (region & (labels != NOSE)) | np.isin(labels, MOUTH_AND_LIPS)
    return keep.astype(np.uint8) * 255


def square_mask(region: np.ndarray, box: FaceBox, square: Square) -> np.ndarray:
    """Blend mask (uint8, 0..255) over the square, from a 512x512 `parsing_region`.

    The region is resized to the square with PIL's bicubic (the official `face_seg`'s
    `Image.resize`, whose default for mode L is BICUBIC), cut to the face box and to the square's
    lower half (rows >= s: below about the nose), then Gaussian-blurred.
    """
    sx1, sy1, sx2, _ = square
    side = sx2 - sx1
    # The whole square, not just the box: PIL places its samples from the output size and box, so
    # resizing only the box's part (`box=`) is up to a level off the official mask.
    resized = np.asarray(Image.fromarray(region).resize((side, side), Image.Resampling.BICUBIC))
    x1, y1, x2, y2 = box
    top = min(max(y1 - sy1, side // 2), side)
    bottom = min(max(y2 - sy1, 0), side)
    left = min(max(x1 - sx1, 0), side)
    right = min(max(x2 - sx1, 0), side)
    mask = np.zeros((side, side), np.uint8)
    if top >= bottom or left >= right:
        return mask
    kernel = int(BLUR_FRACTION * side // 2 * 2) + 1
    # The blur of the whole square, computed around the non-zero rectangle only (a third of the
    # square at most; the blur is most of a mask's cost): a pixel more than `reach` from the
    # rectangle stays 0, and one within `reach` of it sees, within `reach` of itself, only pixels
    # of the window, which stands a further `reach` out. At the square's sides the window meets
    # them, so cv2's border there is the same reflection as the whole square's.
    reach = kernel // 2

    def grown(by: int) -> tuple[int, int, int, int]:
        return max(top - by, 0), min(bottom + by, side), max(left - by, 0), min(right + by, side)

    wy0, wy1, wx0, wx1 = grown(2 * reach)
    window = np.zeros((wy1 - wy0, wx1 - wx0), np.uint8)
    window[top - wy0 : bottom - wy0, left - wx0 : right - wx0] = resized[top:bottom, left:right]
    blurred = cv2.GaussianBlur(window, (kernel, kernel), 0)
    r0, r1, c0, c1 = grown(reach)
    mask[r0:r1, c0:c1] = blurred[r0 - wy0 : r1 - wy0, c0 - wx0 : c1 - wx0]
    return mask


def _parser_input(frame: np.ndarray | DeviceFrame, square: Square) -> np.ndarray:
    """The square cut from the frame (black outside it, as PIL's crop pads), resized to 512x512
    with PIL's bilinear as the official `FaceParsing` resizes it, still BGR uint8 (PIL resamples
    each channel alike, so the order does not matter)."""
    sx1, sy1, sx2, sy2 = square
    h, w = frame.shape[:2]
    ix1, iy1, ix2, iy2 = max(sx1, 0), max(sy1, 0), min(sx2, w), min(sy2, h)
    crop = cv2.copyMakeBorder(
        frame[iy1:iy2, ix1:ix2], iy1 - sy1, sy2 - iy2, ix1 - sx1, sx2 - ix2, cv2.BORDER_CONSTANT, value=0
    )
    return np.asarray(Image.fromarray(crop).resize((PARSING_SIZE, PARSING_SIZE), Image.Resampling.BILINEAR))


class ParsingMask:
    """Face-parsing blend masks for (original frame, face box) pairs, BiSeNet batched."""

    def __init__(
        self,
        models: Any,
        mode: ParsingMode = "jaw",
        left_cheek_width: int = 90,
        right_cheek_width: int = 90,
    ):
        """`models` needs `.face_parser`, `.device` and `.dtype` (a `ModelBundle`)."""
        if mode != "jaw" and mode not in MODE_CLASSES:
            raise ValueError(f"unknown parsing mode {mode!r}")
        self.models = models
        self.mode = mode
        self.left_cheek_width = left_cheek_width
        self.right_cheek_width = right_cheek_width
        self._mean = torch.tensor(IMAGENET_MEAN, device=models.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(IMAGENET_STD, device=models.device).view(1, 3, 1, 1) * 255

    def labels(self, frames: Sequence[np.ndarray], squares: Sequence[Square]) -> np.ndarray:
        """BiSeNet label maps `[n, 512, 512]` uint8 of the squares cut from the original frames."""
        out = np.empty((len(frames), PARSING_SIZE, PARSING_SIZE), dtype=np.uint8)
        inputs = np.empty((len(frames), PARSING_SIZE, PARSING_SIZE, 3), dtype=np.uint8)

        def cut(i: int) -> None:
            inputs[i] = _parser_input(frames[i], squares[i])

        for_each_index(cut, len(frames))
        for start in range(0, len(frames), PARSE_BATCH):
            chunk = inputs[start : start + PARSE_BATCH]
            # Upload uint8 and normalise on the device: a quarter of the bytes of float32.
            pixels = torch.from_numpy(chunk).to(self.models.device).permute(0, 3, 1, 2).flip(1).float()
            pixels = ((pixels - self._mean) / self._std).to(self.models.dtype)
            with torch.inference_mode():
                logits = self.models.face_parser(pixels)
            out[start : start + len(chunk)] = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
        return out

    def __call__(self, frames: Sequence[np.ndarray], boxes: Sequence[FaceBox]) -> list[np.ndarray]:
        """Blend masks, one uint8 `[2s, 2s]` array per (frame, box) over `crop_square(box)`; alpha = mask / 255."""
        squares = [crop_square(box)[0] for box in boxes]
        label_maps = self.labels(frames, squares)
        masks: list[np.ndarray | None] = [None] * len(boxes)  # each filled by `finish`

        def finish(i: int) -> None:
            region = parsing_region(label_maps[i], self.mode, self.left_cheek_width, self.right_cheek_width)
            masks[i] = square_mask(region, boxes[i], squares[i])

        # On threads: the dilations and the blur (cv2) and the bicubic resize (PIL) release the GIL.
        # On a new video masks are made in the writer thread, which bounds the request: in a
        # py-spy of a cold request on the H100, a third of that thread's samples were in here.
        for_each_index(finish, len(boxes))
        return masks


@dataclass(frozen=True)
class _CachedMask:
    """A square mask stored as its non-zero bounding box (most of the square is zero)."""

    side: int
    top: int
    left: int
    values: np.ndarray

    @classmethod
    def from_square(cls, mask: np.ndarray) -> "_CachedMask":
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return cls(mask.shape[0], 0, 0, mask[:0, :0].copy())
        values = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy()
        return cls(mask.shape[0], int(rows[0]), int(cols[0]), values)

    def scaled(self, side: int) -> "_CachedMask":
        """The same mask for a square of another size (the face moved closer or further)."""
        if side == self.side:
            return self
        if self.values.size == 0:
            return _CachedMask(side, 0, 0, self.values)
        f = side / self.side
        h, w = self.values.shape
        size = (max(1, round(w * f)), max(1, round(h * f)))
        values = cv2.resize(self.values, size, interpolation=cv2.INTER_LINEAR)
        return _CachedMask(side, round(self.top * f), round(self.left * f), values)


@dataclass(frozen=True)
class PasteRegion:
    """The pixels of a frame that one generated face is blended into, and their mask.

    Frame rows `top:bottom` and columns `left:right`: the face box cut to the frame and to the
    mask's non-zero bounding box (outside it alpha is 0, so the composite is the original frame).
    `mask` is the uint8 blend mask over exactly those pixels: alpha = mask * `ALPHA_SCALE`.
    """

    top: int
    bottom: int
    left: int
    right: int
    values: np.ndarray
    """The cached mask's stored values, which `mask` is a window of."""
    window: tuple[int, int, int, int]
    """(r0, r1, c0, c1) of `mask` within `values`."""

    @property
    def mask(self) -> np.ndarray:
        r0, r1, c0, c1 = self.window
        return self.values[r0:r1, c0:c1]


def _paste_region(frame_shape: tuple[int, ...], box: FaceBox, mask: _CachedMask) -> PasteRegion | None:
    """Where `mask` (cached for this box or an earlier one) blends a face at `box`; None: nowhere."""
    (sx1, sy1, _, _), s = crop_square(box)
    if s == 0:
        return None
    scaled = mask.scaled(2 * s)
    x1, y1, x2, y2 = box
    h, w = frame_shape[:2]
    top, left = sy1 + scaled.top, sx1 + scaled.left  # the stored values' origin, in frame pixels
    r0, r1 = max(y1, top, 0), min(y2, top + scaled.values.shape[0], h)
    c0, c1 = max(x1, left, 0), min(x2, left + scaled.values.shape[1], w)
    if r0 >= r1 or c0 >= c1:
        return None
    return PasteRegion(r0, r1, c0, c1, scaled.values, (r0 - top, r1 - top, c0 - left, c1 - left))


def check_weights(boxes: Sequence[FaceBox | None], weights: Sequence[float] | None) -> None:
    """Raise ValueError unless `weights` (None: all 1) has one weight per frame, in (0, 1] for
    every frame with a box: a compositor blends a frame's face with its alpha scaled by its weight,
    and a frame of weight 0 is not generated (no face for it: box None)."""
    if weights is None:
        return
    if len(weights) != len(boxes):
        raise ValueError(f"{len(boxes)} frames but {len(weights)} weights")
    bad = [k for k, (box, w) in enumerate(zip(boxes, weights)) if box is not None and not 0 < w <= 1]
    if bad:
        raise ValueError(f"frames {bad} have a box and a weight outside (0, 1]; a frame not generated has no box")


class FaceBlender:
    """Per-request blender: pastes generated faces into frames with cached face-parsing masks.

    Masks are keyed by `source_index - source_index % mask_every` and computed from the first
    frame of a key that is blended. With `retain=False` (the video plays forward once) only the
    keys of the current call are kept, so memory stays flat however long the output is; with
    `retain=True` (ping-pong playback revisits source frames) every key is kept, bounded by the
    source length / mask_every, each mask stored as its non-zero bounding box only.

    `fallbacks` counts frames whose fast blend raised and that were recomputed from a fresh mask.
    """

    def __init__(
        self,
        models: Any,
        request: LipsyncRequest,
        retain: bool = False,
        masks: Mapping[int, MaskEntry] | None = None,
        parses_on_demand: bool = True,
    ):
        """`models` as for `ParsingMask`; the request's parsing options and `mask_every` are read.
        `masks` preloads prepared masks (a cached avatar's, see `export_masks`): they are never
        pruned, so a request on a prepared avatar runs no face parsing at all.
        `parses_on_demand=False` (the pipeline, whose parse phase makes every mask first with
        `prepare_masks`): `blend_batch` and `regions` parse nothing; a mask they lack is a fallback."""
        if request.mask_every < 1:
            raise ValueError(f"mask_every must be >= 1, got {request.mask_every}")
        self.parser = ParsingMask(models, request.parsing_mode, request.left_cheek_width, request.right_cheek_width)
        self.mask_every = request.mask_every
        self.retain = retain
        self.parses_on_demand = parses_on_demand
        self.fallbacks = 0
        self._masks: dict[int, _CachedMask] = {}
        self._preloaded: dict[int, _CachedMask] = {
            key: _CachedMask(side, top, left, values) for key, (values, top, left, side) in (masks or {}).items()
        }
        self._alpha_memo: tuple[np.ndarray, tuple[int, int, int, int], np.ndarray] | None = None

    def prepare_masks(
        self, frames: Sequence[np.ndarray], boxes: Sequence[FaceBox | None], source_indices: Sequence[int]
    ) -> None:
        """Compute the masks these frames need (one batched BiSeNet pass) without blending."""
        self._compute_missing(frames.__getitem__, boxes, self._keys(source_indices))

    def export_masks(self) -> dict[int, MaskEntry]:
        """Every mask held, as plain `(values, top, left, side)` tuples keyed like the cache."""
        held = {**self._preloaded, **self._masks}
        return {key: (m.values, m.top, m.left, m.side) for key, m in held.items()}

    def blend(self, frame: np.ndarray, face: np.ndarray, box: FaceBox | None, source_index: int) -> np.ndarray:
        """Blend one generated face into `frame` in place and return `frame`; see `blend_batch`."""
        return self.blend_batch([frame], [face], [box], [source_index])[0]

    def blend_batch(
        self,
        frames: Sequence[np.ndarray],
        faces: Sequence[np.ndarray],
        boxes: Sequence[FaceBox | None],
        source_indices: Sequence[int],
        weights: Sequence[float] | None = None,
    ) -> Sequence[np.ndarray]:
        """Blend `faces` (`[256, 256, 3]` BGR uint8) into `frames` at `boxes`, in place.

        Each frame must be a writable buffer the caller owns and must still hold the ORIGINAL
        source pixels (masks are parsed from it before it is written): pass a copy when the same
        source frame is output more than once. Returns `frames` itself (a `[B, H, W, 3]` batch
        array is blended in place too). Frames with box None are left untouched.
        `weights`, one per frame (default all 1): how much of the generated face each frame with
        a box shows, in (0, 1]: its alpha is scaled by it (a cross-fade to the source frame, see
        `pipeline.silence`); weight 1 blends exactly as without weights. A frame that shows none
        of it is one that is not generated: give it box None (`check_weights`).
        Missing masks of the batch are parsed in one batched BiSeNet pass. No frame is dropped:
        if the fast blend fails on a frame, that frame is redone with a fresh mask.
        """
        keys = self._keys(source_indices)
        check_weights(boxes, weights)
        self._masks_for(frames.__getitem__, boxes, keys)
        for k, (frame, face, box, key, index) in enumerate(zip(frames, faces, boxes, keys, source_indices)):
            if box is None:
                continue
            weight = 1.0 if weights is None else float(weights[k])
            try:
                self._paste(frame, face, box, self._cached(key), weight)
            except Exception as exc:  # noqa: BLE001 - any failure of the fast path gets the slow one
                self._paste(frame, face, box, self._refresh_mask(frame, box, key, index, exc), weight)
        return frames

    def regions(
        self,
        frame_shape: tuple[int, ...],
        boxes: Sequence[FaceBox | None],
        source_indices: Sequence[int],
        frame_at: Callable[[int], np.ndarray],
    ) -> list[PasteRegion | None]:
        """Where and with which mask `blend_batch` would blend each frame's face, for another
        compositor (`compose.GpuComposer`) to blend with the very same alpha.

        `frame_shape`: (H, W, ...) of every frame. `frame_at(k)`: frame k as the original BGR
        source pixels `[H, W, 3]`, called only for the frames whose mask must be parsed (missing
        masks are parsed and cached as for `blend_batch`; a frame whose region can't be had from
        its cached mask gets a fresh mask, counted in `fallbacks`), so a compositor that holds
        frames in another form converts only those. None for a frame with no box or nothing to blend.
        """
        keys = self._keys(source_indices)
        self._masks_for(frame_at, boxes, keys)
        out: list[PasteRegion | None] = []
        for k, (box, key, index) in enumerate(zip(boxes, keys, source_indices)):
            if box is None:
                out.append(None)
                continue
            try:
                out.append(_paste_region(frame_shape, box, self._cached(key)))
            except Exception as exc:  # noqa: BLE001 - as in blend_batch
                out.append(_paste_region(frame_shape, box, self._refresh_mask(frame_at(k), box, key, index, exc)))
        return out

    def _keys(self, source_indices: Sequence[int]) -> list[int]:
        return [i - i % self.mask_every for i in source_indices]

    def _cached(self, key: int) -> _CachedMask:
        return self._masks.get(key) or self._preloaded[key]

    def _refresh_mask(self, frame: np.ndarray, box: FaceBox, key: int, index: int, exc: Exception) -> _CachedMask:
        """The slow path: parse a fresh mask for this frame and cache it in place of the failed one."""
        logger.warning("fast blend failed at source frame %d (%s); recomputing its mask", index, exc)
        self.fallbacks += 1
        self._masks[key] = _CachedMask.from_square(self.parser([frame], [box])[0])
        return self._masks[key]

    def _masks_for(self, frame_at: Callable[[int], np.ndarray], boxes: Sequence[FaceBox | None], keys: list[int]) -> None:
        """Before blending: the masks of `keys` parsed where missing (`parses_on_demand`), the
        others let go of (unless `retain`)."""
        if self.parses_on_demand:
            self._compute_missing(frame_at, boxes, keys)
        else:
            self._prune(keys)

    def _prune(self, keys: list[int]) -> None:
        if not self.retain:
            needed = set(keys)
            self._masks = {k: v for k, v in self._masks.items() if k in needed}

    def _compute_missing(self, frame_at: Callable[[int], np.ndarray], boxes: Sequence[FaceBox | None], keys: list[int]) -> None:
        self._prune(keys)
        todo: dict[int, int] = {}
        for position, (box, key) in enumerate(zip(boxes, keys)):
            if box is not None and key not in self._masks and key not in self._preloaded and key not in todo:
                todo[key] = position
        if not todo:
            return
        positions = list(todo.values())
        masks = self.parser([frame_at(p) for p in positions], [boxes[p] for p in positions])
        for key, mask in zip(todo, masks):
            self._masks[key] = _CachedMask.from_square(mask)

    def _paste(self, frame: np.ndarray, face: np.ndarray, box: FaceBox, mask: _CachedMask, weight: float = 1.0) -> None:
        # Outside the box the composite is the original frame whatever alpha is, so only the part
        # of the box where the mask is non-zero (its lower half plus the blur margin) is touched.
        region = _paste_region(frame.shape, box, mask)
        if region is None:
            return
        alpha = self._alpha(region)
        if weight != 1:
            alpha = alpha * np.float32(weight)  # a new array: the memoised alpha stays the mask's
        x1, y1, x2, y2 = box
        resized = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
        generated = resized[region.top - y1 : region.bottom - y1, region.left - x1 : region.right - x1]
        original = frame[region.top : region.bottom, region.left : region.right]
        out = generated.astype(np.float32)
        out -= original
        out *= alpha
        out += original
        out += 0.5  # the cast below truncates; +0.5 rounds (values stay within [0, 255.5))
        np.copyto(original, out, casting="unsafe")

    def _alpha(self, region: PasteRegion) -> np.ndarray:
        """float32 alpha `[h, w, 1]` of `region.mask`, memoised while the box stays put."""
        memo = self._alpha_memo
        if memo is not None and memo[0] is region.values and memo[1] == region.window:
            return memo[2]
        alpha = region.mask[:, :, None].astype(np.float32) * ALPHA_SCALE
        self._alpha_memo = (region.values, region.window, alpha)
        return alpha
