"""FAN 68-point 2D landmark network (2DFAN4), laid out as face-alignment publishes it.

Four stacked hourglasses of depth 4 built from ConvBlocks (Bulat & Tzimiropoulos 2017). Module
names and shapes match face-alignment's 2DFAN4 state dict (`2DFAN4-11f355bf06.pth.tar`, which
face-alignment 1.5 loads; its older `2DFAN-4.pth.tar` has the same keys) and the state dict inside
its TorchScript release (`2DFAN4-cd938726ad.zip`). Down-sampling is average pooling and
up-sampling nearest, as in the face-alignment code that loads those weights (its first 2017 code
used max pooling, with the same keys).

Landmarks follow face-alignment's convention: a box gives a centre (moved up by 0.12 of the box
height) and a crop side of 200·(w + h)/195 px, cropped to 256x256 RGB / 255; the network returns
64x64 heatmaps whose peaks, refined by a quarter cell towards the higher neighbour, map back to the
frame. Coordinates are continuous pixels like S3FD's boxes (pixel i spans [i, i+1)).
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musetalk_service.nets.loading import StateDict, WeightsFileError, load_state_dict
from musetalk_service.parallel import for_each_index

logger = logging.getLogger(__name__)

NUM_LANDMARKS = 68
CROP_SIZE = 256
SIZES = {"tiny": (1, 16), "full": (4, 256)}  # (stacked hourglasses, feature width)

_HOURGLASS_DEPTH = 4
_CENTER_Y_SHIFT = 0.12  # the detector's boxes sit low on the face: move the centre up
_REFERENCE_SCALE = 195.0  # box w + h of a face at scale 1 (S3FD's box size convention)
_CROP_PER_SCALE = 200.0  # crop side in frame pixels per unit of scale
_STACK_OUTPUT = re.compile(r"^l(\d+)\.weight$")


def _conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)


class ConvBlock(nn.Module):
    """Pre-activation residual block whose three 3x3 convs (out/2, out/4, out/4) are concatenated."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv3x3(in_ch, out_ch // 2)
        self.bn2 = nn.BatchNorm2d(out_ch // 2)
        self.conv2 = _conv3x3(out_ch // 2, out_ch // 4)
        self.bn3 = nn.BatchNorm2d(out_ch // 4)
        self.conv3 = _conv3x3(out_ch // 4, out_ch // 4)
        self.downsample = (
            nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(), nn.Conv2d(in_ch, out_ch, 1, bias=False))
            if in_ch != out_ch
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat([out1, out2, out3], dim=1) + residual


class HourGlass(nn.Module):
    """Recursive hourglass: level l keeps a full-resolution branch (b1_l) and recurses at half size."""

    def __init__(self, depth: int, features: int):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(features, features))
            self.add_module(f"b2_{level}", ConvBlock(features, features))
            self.add_module(f"b3_{level}", ConvBlock(features, features))
        self.b2_plus_1 = ConvBlock(features, features)

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        upper = self.get_submodule(f"b1_{level}")(x)
        lower = self.get_submodule(f"b2_{level}")(F.avg_pool2d(x, 2, stride=2))
        lower = self._level(level - 1, lower) if level > 1 else self.b2_plus_1(lower)
        lower = self.get_submodule(f"b3_{level}")(lower)
        return upper + F.interpolate(lower, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class FAN(nn.Module):
    """Stacked-hourglass landmark network: [B,3,256,256] RGB in [0,1] -> heatmaps [B,68,64,64].

    Only the last stack's heatmaps are returned: the earlier ones serve training supervision and
    feed the next stack (through `al{i}`), which happens inside `forward`.
    """

    def __init__(self, num_modules: int = SIZES["full"][0], width: int = SIZES["full"][1]):
        super().__init__()
        if num_modules < 1 or width % 8:
            raise ValueError(f"need num_modules >= 1 and width a multiple of 8, got {num_modules}, {width}")
        self.num_modules = num_modules
        self.width = width
        self.conv1 = nn.Conv2d(3, width // 4, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(width // 4)
        self.conv2 = ConvBlock(width // 4, width // 2)
        self.conv3 = ConvBlock(width // 2, width // 2)
        self.conv4 = ConvBlock(width // 2, width)
        for i in range(num_modules):
            self.add_module(f"m{i}", HourGlass(_HOURGLASS_DEPTH, width))
            self.add_module(f"top_m_{i}", ConvBlock(width, width))
            self.add_module(f"conv_last{i}", nn.Conv2d(width, width, 1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(width))
            self.add_module(f"l{i}", nn.Conv2d(width, NUM_LANDMARKS, 1))
            if i < num_modules - 1:
                self.add_module(f"bl{i}", nn.Conv2d(width, width, 1))
                self.add_module(f"al{i}", nn.Conv2d(NUM_LANDMARKS, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.avg_pool2d(self.conv2(x), 2, stride=2)
        previous = self.conv4(self.conv3(x))
        for i in range(self.num_modules):
            features = self.get_submodule(f"top_m_{i}")(self.get_submodule(f"m{i}")(previous))
            features = F.relu(self.get_submodule(f"bn_end{i}")(self.get_submodule(f"conv_last{i}")(features)))
            heatmaps = self.get_submodule(f"l{i}")(features)
            if i < self.num_modules - 1:
                previous = (
                    previous
                    + self.get_submodule(f"bl{i}")(features)
                    + self.get_submodule(f"al{i}")(heatmaps)
                )
        return heatmaps


def build(size: str = "full") -> FAN:
    """A randomly initialised FAN in eval mode: "full" (2DFAN4 shapes) or "tiny" (tests)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return FAN(*SIZES[size]).eval()


def load(path: str | Path, device: str | torch.device = "cpu") -> FAN:
    """Load a FAN state dict strictly, in eval mode on `device`; stack count and width come from the file.

    Accepts a plain state dict (.pth/.pth.tar/.safetensors) or a TorchScript archive (face-alignment
    >= 1.3 distributes 2DFAN4 that way), whose weights are taken and run by this module's code.
    Raises WeightsFileError naming the file when it is unreadable or not a FAN.
    """
    state = _read_torchscript_state(path) if _is_torchscript(path) else load_state_dict(path)
    stacks = sorted(int(m[1]) for m in map(_STACK_OUTPUT.match, state) if m)
    if not stacks or stacks != list(range(len(stacks))) or state["l0.weight"].ndim != 4:
        raise WeightsFileError(path, "not a FAN state dict (no l0.weight ... l{n-1}.weight heatmap heads)")
    num_modules, width = len(stacks), state["l0.weight"].shape[1]
    with torch.device("meta"):
        model = FAN(num_modules, width)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsFileError(path, f"does not fit FAN({num_modules}, {width}): {e}") from e
    logger.info("FAN with %d stacks of width %d loaded from %s", num_modules, width, path)
    return model.to(device).eval()


def _is_torchscript(path: str | Path) -> bool:
    # Both torch.save and torch.jit.save write zip archives; only TorchScript stores code/.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _read_torchscript_state(path: str | Path) -> StateDict:
    try:
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    # torch.jit.load raises RuntimeError for most broken archives, others for odd ones: all mean "unreadable".
    except Exception as e:
        raise WeightsFileError(path, f"unreadable TorchScript archive ({type(e).__name__}: {e})") from e


def _crop_frames(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres [n,2] and crop sides [n] in frame pixels for boxes [n,4] (x1,y1,x2,y2)."""
    boxes = boxes.astype(np.float64)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    centers = np.stack([boxes[:, 0] + w / 2, boxes[:, 1] + h / 2 - _CENTER_Y_SHIFT * h], axis=1)
    return centers, _CROP_PER_SCALE * (w + h) / _REFERENCE_SCALE


def crop_faces(frames_bgr: np.ndarray, boxes: np.ndarray, frame_index: np.ndarray) -> np.ndarray:
    """The network's input crops [n,256,256,3] uint8, still BGR, one per box.

    face-alignment crops the integer pixel span from c - 127/256·side to c + side/2 and resizes it
    to 256 (bilinear, zeros outside the frame). This samples the same span with one sub-pixel
    exact warpAffine per face, skipping the intermediate copy and the integer rounding (< 1 px).

    Each face reads only the frame pixels its samples touch, as one `frame[rows, cols]` slice, so
    `frames_bgr` may also be frames that live elsewhere and read regions back on slicing
    (`pipeline.frames.DeviceFrames`).
    """
    centers, sides = _crop_frames(boxes)
    crops = np.empty((len(boxes), CROP_SIZE, CROP_SIZE, 3), np.uint8)
    height, width = frames_bgr.shape[1:3]

    def crop(i: int) -> None:
        (cx, cy), side = centers[i], sides[i]
        step = side * (CROP_SIZE - 1) / CROP_SIZE**2  # frame pixels per crop pixel
        first = -(CROP_SIZE / 2 - 1) * side / CROP_SIZE + step / 2 - 0.5  # crop pixel 0, from the centre
        x0, y0 = cx + first, cy + first
        # Bilinear samples from x0 to x0 + 255 steps touch columns floor(x) and floor(x) + 1.
        span = step * (CROP_SIZE - 1)
        left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
        right, bottom = min(width, math.floor(x0 + span) + 2), min(height, math.floor(y0 + span) + 2)
        if right <= left or bottom <= top:  # the face's span lies outside the frame: all border
            crops[i] = 0
            return
        to_region = np.array([[step, 0.0, x0 - left], [0.0, step, y0 - top]])
        crops[i] = cv2.warpAffine(
            frames_bgr[frame_index[i]][top:bottom, left:right],
            to_region,
            (CROP_SIZE, CROP_SIZE),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )

    # About 0.7 ms per 1080p face: a third of the tracked face phase's time when done in turn.
    for_each_index(crop, len(boxes))
    return crops


def heatmaps_to_landmarks(heatmaps: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
    """Frame coordinates [n,68,2] float32 of the heatmap peaks [n,68,R,R] of crops made from `boxes` [n,4].

    The peak cell moves a quarter cell towards its higher horizontal and vertical neighbour (not on
    the border), and cell j's centre j + 0.5 maps to centre + (j + 0.5 - R/2)·side/R. face-alignment
    then truncates to whole pixels; rounding is left to the caller here.
    """
    n, k, res, _ = heatmaps.shape
    flat = heatmaps.float().reshape(n, k, res * res)
    peak = flat.argmax(dim=-1)
    y, x = peak // res, peak % res
    inside = (x > 0) & (x < res - 1) & (y > 0) & (y < res - 1)

    def value(dy: int, dx: int) -> torch.Tensor:
        index = ((y + dy).clamp(0, res - 1) * res + (x + dx).clamp(0, res - 1)).unsqueeze(-1)
        return flat.gather(-1, index).squeeze(-1)

    dx = torch.sign(value(0, 1) - value(0, -1)) * inside
    dy = torch.sign(value(1, 0) - value(-1, 0)) * inside
    cells = torch.stack([x + 0.5 + 0.25 * dx, y + 0.5 + 0.25 * dy], dim=-1).cpu().numpy()
    centers, sides = _crop_frames(boxes)
    landmarks = centers[:, None, :] + (cells - res / 2) * (sides / res)[:, None, None]
    return landmarks.astype(np.float32)


@torch.inference_mode()
def predict_landmarks(
    model: nn.Module, frames_bgr: np.ndarray, boxes: np.ndarray, frame_index: np.ndarray
) -> np.ndarray:
    """68 landmarks [n,68,2] float32 in frame pixels for face boxes [n,4] (x1,y1,x2,y2) in frames [B,H,W,3].

    `frame_index[i]` says which frame box i is in, so several faces of a frame, or one face per
    frame of a batch, go through the network in one pass on the model's device and dtype. Points
    are iBUG-68 order (0-16 jaw, 17-26 brows, 27-35 nose, 36-47 eyes, 48-67 mouth).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    frame_index = np.asarray(frame_index, dtype=np.int64).reshape(-1)
    if frames_bgr.ndim != 4 or frames_bgr.shape[-1] != 3 or frames_bgr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [B,H,W,3], got {frames_bgr.dtype} {frames_bgr.shape}")
    if len(frame_index) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(frame_index)} frame indices")
    if len(boxes) == 0:
        return np.zeros((0, NUM_LANDMARKS, 2), np.float32)
    if frame_index.min() < 0 or frame_index.max() >= len(frames_bgr):
        raise ValueError(f"frame_index must be in [0, {len(frames_bgr)}), got {frame_index.min()}..{frame_index.max()}")
    weight = next(model.parameters())
    crops = torch.from_numpy(crop_faces(frames_bgr, boxes, frame_index)).to(weight.device)
    x = crops.permute(0, 3, 1, 2).flip(1).to(weight.dtype) / 255.0
    return heatmaps_to_landmarks(model(x), boxes)
