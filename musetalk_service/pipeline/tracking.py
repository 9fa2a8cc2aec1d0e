"""Face tracking between detections: keyframe interpolation, face choice, box smoothing, metrics.

The face phase detects on keyframes only (`keyframe_positions`: every N frames, where detection
at 1080p dominates the face cost), fills the frames in between with `interpolate_boxes` so the box
keeps moving with the head instead of freezing for N frames, picks one face per keyframe with
`pick_face`, and smooths the final per-frame crop boxes with `OneEuroBoxSmoother`. `box_jitter`,
`box_lag` and `box_error` measure the result (tests, benchmark).

Boxes are `FaceBox` tuples (x1, y1, x2, y2), ints, x2/y2 exclusive; `None` is a frame without a face.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from musetalk_service.contract import FaceBox

logger = logging.getLogger(__name__)

BoxLike = Sequence[float] | np.ndarray
"""Anything indexable as x1, y1, x2, y2 (extra trailing values such as a score are ignored)."""


@dataclass(frozen=True)
class SmoothingParams:
    """One-Euro filter parameters for the crop boxes (Casiez et al., CHI 2012).

    Speeds are in face sizes per second (the box's geometric-mean side), not pixels, so one
    setting behaves the same on a 100 px face in 480p and a 500 px face in 4K: detector noise and
    head speed both scale with the face.

    Defaults tuned on synthetic 200 px boxes at 25 fps with Gaussian noise of sigma 2 px on every
    edge (mean of 4 seeds; raw input jitter 2.6 px): a still head gives 0.15 px mean jitter
    after settling (~2/3 of frames exactly still; with +-2 px integer noise, 0.05 px); a 20 px / 0.5 Hz head turn is followed with a
    lag of 1 frame and 2.0 px mean centre error; a 40 px / 1 Hz turn with 0 frames and 3.6 px; a
    slow 5 px/s drift with 1.1 px. Raising beta (or d_cutoff) trades still-head jitter for less
    lag; raising speed_floor the other way.
    """

    min_cutoff: float = 0.2
    """Hz. Cutoff while the head is still: lower is steadier."""
    beta: float = 15.0
    """Hz per (face size / s) above speed_floor: how fast the cutoff opens with head speed."""
    d_cutoff: float = 1.0
    """Hz. Cutoff of the speed estimate itself."""
    speed_floor: float = 0.1
    """Face sizes / s. Speed below this is taken for detector noise and does not open the cutoff;
    without it the noise of a still head alone lifts the cutoff several-fold."""
    fps: float = 25.0
    """Frame rate of the boxes; set it to the video's rate (`dataclasses.replace`)."""
    hold_px: float = 0.8
    """An int output coordinate moves only once the filtered value is this far from it: the
    sub-pixel wobble left after filtering would otherwise flip it between two integers."""
    jump_iou: float = 0.1
    """A box overlapping the previous input box less than this restarts the filter (a cut, or
    another face), so the crop jumps at once instead of sliding across the frame."""

    def __post_init__(self) -> None:
        if min(self.min_cutoff, self.d_cutoff, self.fps) <= 0:
            raise ValueError(f"min_cutoff, d_cutoff and fps must be > 0: {self}")
        if min(self.beta, self.speed_floor, self.hold_px) < 0 or not 0 <= self.jump_iou <= 1:
            raise ValueError(f"beta, speed_floor, hold_px must be >= 0 and jump_iou in [0, 1]: {self}")


class _LowPass:
    """First-order exponential smoothing of a vector, the building block of the One-Euro filter."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None

    def __call__(self, x: np.ndarray, alpha: float) -> np.ndarray:
        self.value = x if self.value is None else self.value + alpha * (x - self.value)
        return self.value


def _alpha(cutoff: float, fps: float) -> float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau * fps)


class OneEuroBoxSmoother:
    """Stateful One-Euro smoothing of one face's boxes, fed one frame at a time.

    The filter runs on the box centre (cx, cy) and size (w, h), not on the four edges. Head
    motion moves the centre while the size stays put, so the centre's cutoff opens with the head
    speed while the size, whose own speed stays near zero, keeps its low cutoff: the crop does
    not breathe while the head turns. Measured with the default parameters (200 px box, noise
    sigma 2 px per edge): frame-to-frame width change during a 0.5 Hz / 1 Hz head turn 0.6 px
    (four edge filters: 1.6 / 2.3 px) and still-head jitter 0.15 px (edges: 0.43 px), for a
    centre error in motion 0.3-0.6 px higher. The 2-D centre speed drives x and y together so
    the box moves as one.

    A `None` (no face) resets the state: the face that comes back, possibly elsewhere, starts
    fresh instead of being dragged from where the last one was.
    """

    def __init__(self, params: SmoothingParams | None = None) -> None:
        self.params = params or SmoothingParams()
        self.reset()

    def reset(self) -> None:
        """Forget the past; the next box is passed through unchanged and starts a new track."""
        self._centre = _LowPass()
        self._size = _LowPass()
        self._d_centre = _LowPass()
        self._d_size = _LowPass()
        self._last_input: np.ndarray | None = None
        self._last_output: np.ndarray | None = None

    def update(self, box: BoxLike | None) -> FaceBox | None:
        """Smooth the box of the next frame; `None` (no face) passes through and resets."""
        if box is None:
            self.reset()
            return None
        edges = np.asarray(box, dtype=np.float64)[:4]
        if self._last_input is not None and box_iou(edges, self._last_input) < self.params.jump_iou:
            logger.debug("face box jumped (IoU < %.2f): restarting the smoother", self.params.jump_iou)
            self.reset()
        self._last_input = edges
        centre = (edges[:2] + edges[2:]) / 2.0
        size = np.maximum(edges[2:] - edges[:2], 1.0)
        if self._centre.value is None:
            centre_f, size_f = self._centre(centre, 1.0), self._size(size, 1.0)
            self._d_centre(np.zeros(2), 1.0)
            self._d_size(np.zeros(2), 1.0)
        else:
            scale = float(np.sqrt(np.prod(self._size.value)))
            centre_f = self._step(self._centre, self._d_centre, centre, scale)
            size_f = self._step(self._size, self._d_size, size, scale)
        filtered = np.concatenate([centre_f - size_f / 2.0, centre_f + size_f / 2.0])
        return self._quantise(filtered)

    def _step(self, value: _LowPass, speed: _LowPass, x: np.ndarray, scale: float) -> np.ndarray:
        p = self.params
        # Measured against the previous *filtered* value, not the previous sample as in the
        # reference code: the gap includes how far the filter trails, so a slow drift opens the
        # cutoff too (5 px/s drift: 1.0 px error instead of 3.9 px) and there is one noise term, not two.
        velocity = (x - value.value) * p.fps / scale
        smoothed_speed = float(np.linalg.norm(speed(velocity, _alpha(p.d_cutoff, p.fps))))
        cutoff = p.min_cutoff + p.beta * max(0.0, smoothed_speed - p.speed_floor)
        return value(x, _alpha(cutoff, p.fps))

    def _quantise(self, filtered: np.ndarray) -> FaceBox:
        rounded = np.floor(filtered + 0.5)
        if self._last_output is not None:
            keep = np.abs(filtered - self._last_output) < self.params.hold_px
            rounded = np.where(keep, self._last_output, rounded)
        self._last_output = rounded
        x1, y1, x2, y2 = (int(v) for v in rounded)
        return (x1, y1, x2, y2)

    def smooth(self, boxes: Sequence[BoxLike | None]) -> list[FaceBox | None]:
        """Feed a whole sequence through `update` (state carries on to later calls)."""
        return [self.update(b) for b in boxes]


def _round_box(values: np.ndarray) -> FaceBox:
    x1, y1, x2, y2 = (int(v) for v in np.floor(values + 0.5))
    return (x1, y1, x2, y2)


def interpolate_boxes(
    key_indices: Sequence[int], key_boxes: Sequence[BoxLike | None], n_frames: int
) -> list[FaceBox | None]:
    """Per-frame boxes from boxes detected on keyframes.

    Rules, chosen so that no face is ever invented:
    - a keyframe keeps its own box (or `None`);
    - between two keyframes that both have a face, each edge is interpolated linearly in time
      (exact, after rounding, for a head moving at constant speed);
    - between two keyframes of which either has no face, every frame is `None`: the face appeared
      or vanished somewhere in between and we do not know where (`frames_to_redetect` lists
      those frames so the caller can detect on them and call this again);
    - before the first keyframe and after the last one, the nearest keyframe's box (or `None`) is
      held, as there is nothing to interpolate towards.

    `key_indices` must be strictly increasing frame indices in [0, n_frames).
    """
    keys = [int(i) for i in key_indices]
    if len(keys) != len(key_boxes):
        raise ValueError(f"{len(keys)} key indices but {len(key_boxes)} key boxes")
    if any(b <= a for a, b in zip(keys, keys[1:])) or (keys and (keys[0] < 0 or keys[-1] >= n_frames)):
        raise ValueError(f"key indices must be strictly increasing within [0, {n_frames}): {keys}")
    out: list[FaceBox | None] = [None] * n_frames
    if not keys:
        return out
    boxes = [None if b is None else np.asarray(b, dtype=np.float64)[:4] for b in key_boxes]
    first, last = boxes[0], boxes[-1]
    for t in range(keys[0]):
        out[t] = None if first is None else _round_box(first)
    for t in range(keys[-1], n_frames):
        out[t] = None if last is None else _round_box(last)
    for (a, box_a), (b, box_b) in zip(zip(keys, boxes), zip(keys[1:], boxes[1:])):
        out[a] = None if box_a is None else _round_box(box_a)
        if box_a is None or box_b is None:
            continue
        for t in range(a + 1, b):
            out[t] = _round_box(box_a + (box_b - box_a) * ((t - a) / (b - a)))
    return out


def keyframe_positions(n_frames: int, every: int, anchored: bool) -> list[int]:
    """Where to run the detector in a run of `n_frames` consecutive frames: evenly spread, at most
    `every` frames apart, the last frame always included.

    Unanchored, frame 0 is a keyframe too. Anchored, the previous run's last keyframe sits just
    before frame 0 (position -1) and counts as the first: a run of 16 with every=5 then needs 4
    detections (3, 7, 11, 15) instead of 4 plus frame 0. Evenly spread rather than every N-th
    frame, because the last frame is a keyframe anyway and N-th frames would put two side by side.
    """
    if n_frames < 1 or every < 1:
        raise ValueError(f"need n_frames >= 1 and every >= 1, got {n_frames}, {every}")
    start = -1 if anchored else 0
    span = n_frames - 1 - start
    intervals = -(-span // every)
    keys = [start + j * span // intervals for j in range(1, intervals + 1)]
    return keys if anchored else [0, *keys]


def frames_to_redetect(
    key_indices: Sequence[int], key_boxes: Sequence[BoxLike | None], min_iou: float = 0.1
) -> list[int]:
    """Frames between keyframes where interpolation cannot be trusted: detect on them too.

    That is every frame strictly between two consecutive keyframes where exactly one has a face
    (it appeared or vanished in between) or where both have faces overlapping less than `min_iou`
    (a cut, or another face). Detecting there and re-running `interpolate_boxes` with those frames
    added as keyframes makes the transitions exact at the cost of a few extra detections.
    """
    frames: list[int] = []
    for (a, box_a), (b, box_b) in zip(zip(key_indices, key_boxes), zip(key_indices[1:], key_boxes[1:])):
        if box_a is None and box_b is None:
            continue
        if box_a is None or box_b is None or box_iou(box_a, box_b) < min_iou:
            frames.extend(range(int(a) + 1, int(b)))
    return frames


def box_iou(a: BoxLike, b: BoxLike) -> float:
    """Intersection over union of two (x1, y1, x2, y2, ...) boxes; 0 when either is empty."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a[:4])
    bx1, by1, bx2, by2 = (float(v) for v in b[:4])
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def pick_face(candidates: np.ndarray, previous_box: BoxLike | None, min_iou: float = 0.3) -> FaceBox | None:
    """Choose one face among a frame's detections ([k, 5]: x1, y1, x2, y2, score).

    The face being tracked wins: the candidate with the highest IoU with `previous_box` (the
    previous keyframe's chosen *detection* box, not the crop box, which has another shape),
    provided that IoU exceeds `min_iou`. Otherwise (first keyframe, after a gap, the tracked face
    gone) the largest candidate wins, i.e. the main speaker in a talking-head shot. A bigger face
    walking into the shot does not steal the track while the tracked one is still there.

    Returns the chosen box rounded to ints with x1/y1 clipped at 0, or `None` when k == 0.
    """
    cands = np.asarray(candidates, dtype=np.float64).reshape(-1, 5)
    if len(cands) == 0:
        return None
    chosen = None
    if previous_box is not None:
        ious = np.array([box_iou(c, previous_box) for c in cands])
        if ious.max() > min_iou:
            chosen = int(np.argmax(ious))
    if chosen is None:
        areas = (cands[:, 2] - cands[:, 0]) * (cands[:, 3] - cands[:, 1])
        chosen = int(np.argmax(areas))
    box = cands[chosen, :4].copy()
    box[:2] = np.maximum(box[:2], 0.0)
    return _round_box(box)


def _centres(boxes: Sequence[BoxLike | None]) -> np.ndarray:
    """[n, 2] box centres, NaN where there is no face."""
    out = np.full((len(boxes), 2), np.nan)
    for i, b in enumerate(boxes):
        if b is not None:
            out[i] = [(float(b[0]) + float(b[2])) / 2.0, (float(b[1]) + float(b[3])) / 2.0]
    return out


def box_jitter(boxes: Sequence[BoxLike | None]) -> float:
    """Mean distance (px) the box centre moves from one frame to the next.

    Pairs involving a frame without a face are skipped; NaN when no pair is left. On a still head
    this is pure jitter; on a moving one it includes the motion, so compare with the truth's value.
    """
    steps = np.linalg.norm(np.diff(_centres(boxes), axis=0), axis=1)
    steps = steps[~np.isnan(steps)]
    return float(steps.mean()) if len(steps) else math.nan


def box_lag(true_boxes: Sequence[BoxLike | None], boxes: Sequence[BoxLike | None], max_lag: int = 12) -> int:
    """The frame shift s in [-max_lag, max_lag] that best aligns `boxes[t]` with `true_boxes[t - s]`.

    This is the cross-correlation of the centre tracks, scored by mean squared centre distance
    over the frames both have a face (mean-removed products would favour shifts that merely keep
    more overlap). Positive s: `boxes` trail the truth by s frames.
    """
    truth, est = _centres(true_boxes), _centres(boxes)
    if len(truth) != len(est):
        raise ValueError(f"{len(truth)} true boxes but {len(est)} boxes")
    best, best_err = 0, math.inf
    # A shift must leave at least one frame in common (short tracks: the bench on a tiny clip).
    max_lag = min(max_lag, len(est) - 1)
    for s in range(-max_lag, max_lag + 1):
        a = est[max(s, 0) : len(est) + min(s, 0)]
        b = truth[max(-s, 0) : len(truth) - max(s, 0)]
        d = np.sum((a - b) ** 2, axis=1)
        d = d[~np.isnan(d)]
        if len(d) and d.mean() < best_err:
            best, best_err = s, float(d.mean())
    return best


def box_error(true_boxes: Sequence[BoxLike | None], boxes: Sequence[BoxLike | None]) -> float:
    """Mean distance (px) between true and estimated box centres, over frames where both have one."""
    d = np.linalg.norm(_centres(boxes) - _centres(true_boxes), axis=1)
    d = d[~np.isnan(d)]
    return float(d.mean()) if len(d) else math.nan
