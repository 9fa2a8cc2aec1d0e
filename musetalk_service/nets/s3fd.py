"""S3FD face detector, laid out as face-alignment publishes it, and MuseTalk's detection rule.

The module names and shapes match face-alignment's checkpoint `s3fd-619a316812.pth` (22.46 M
parameters), so that file loads as is. `width` scales every channel count (64 in the checkpoint) to
give tiny random networks with the same keys for tests.

Detection follows MuseTalk (spec §3.2): RGB input minus (104, 117, 123), softmax, anchors of size
4·stride at strides 4..128, decode with variances (0.1, 0.2), NMS at IoU 0.3 with "+1" areas, keep
score > 0.5. Boxes are continuous pixel coordinates (anchor centres at stride/2 + k·stride).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musetalk_service.nets.loading import WeightsFileError, load_state_dict

logger = logging.getLogger(__name__)

WIDTHS = {"tiny": 4, "full": 64}

# MuseTalk flips BGR to RGB and then subtracts this mean, which the original Caffe S3FD defines in
# BGR order. We keep MuseTalk's order on purpose: its detections, and so its face boxes, are what
# the pipeline reproduces.
_MEAN = (104.0, 117.0, 123.0)
_VARIANCES = (0.1, 0.2)
MIN_INPUT_SIDE = 32
"""Smaller inputs would pool to nothing; `detect_faces` pads them up to it."""
_ANCHOR_PER_STRIDE = 4
# NMS input cap per image. Greedy NMS decides each box from higher-scored boxes alone, so capping
# at the top N changes nothing about which of those N survive, and callers use the best few. It
# bounds the cost where nearly every anchor passes (random weights pass ~20 000 per 1080p frame,
# which took NMS 28 s; trained weights pass tens to hundreds, most of them around the faces). At
# 1000 the greedy loop still took 12 ms a keyframe on the H100 machine's CPU, more than the
# network; 256 keeps every face of a talking-head frame (a face draws a few dozen candidates).
_MAX_NMS_INPUT = 256

# VGG16 stages: (channels as a multiple of width, conv names). Each stage ends with a 2x2 max pool.
_VGG_STAGES = (
    (1, ("conv1_1", "conv1_2")),
    (2, ("conv2_1", "conv2_2")),
    (4, ("conv3_1", "conv3_2", "conv3_3")),
    (8, ("conv4_1", "conv4_2", "conv4_3")),
    (8, ("conv5_1", "conv5_2", "conv5_3")),
)
# The last three VGG stages feed detection heads through an L2Norm: (name, channels as a multiple
# of width, initial scale). Their activations differ in magnitude by stage; the norm evens them out.
_NORMS = (("conv3_3_norm", 4, 10.0), ("conv4_3_norm", 8, 8.0), ("conv5_3_norm", 8, 5.0))

# Detection heads, finest first: (source feature name, channels as a multiple of width).
# Head i works at stride 2**(i + 2).
_HEADS = (
    ("conv3_3_norm", 4),
    ("conv4_3_norm", 8),
    ("conv5_3_norm", 8),
    ("fc7", 16),
    ("conv6_2", 8),
    ("conv7_2", 4),
)
_FIRST_HEAD_CLASSES = 4  # three background scores max-pooled into one, then the face score

# A raw output per head: (class logits [B,2,h,w], box offsets [B,4,h,w]).
HeadOutputs = Sequence[tuple[torch.Tensor, torch.Tensor]]


class L2Norm(nn.Module):
    """Per-position L2 normalisation over channels with a learned per-channel scale."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32: the sum of squares of hundreds of ReLU activations overflows fp16.
        x32 = x.float()
        norm = x32.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
        return (x32 / norm * self.weight.float().view(1, -1, 1, 1)).to(x.dtype)


class S3FD(nn.Module):
    """The S3FD network: VGG16 backbone, extra layers and six (class, box) heads.

    `forward` returns one (class logits [B,2,h,w], box offsets [B,4,h,w]) pair per head, finest
    first, with the first head's three background logits already max-pooled into one.
    """

    def __init__(self, width: int = WIDTHS["full"]):
        super().__init__()
        self.width = width
        in_ch = 3
        for mult, names in _VGG_STAGES:
            for name in names:
                self.add_module(name, nn.Conv2d(in_ch, mult * width, 3, padding=1))
                in_ch = mult * width
        # Padding 3 without dilation, as in face-alignment's port: the fc7 map comes out 4 cells
        # larger than stride 32 alone gives (conv6_2 2, conv7_2 1), with anchors past the image.
        # The checkpoint is only ever run this way (face-alignment, MuseTalk): kept for identical boxes.
        self.fc6 = nn.Conv2d(8 * width, 16 * width, 3, padding=3)
        self.fc7 = nn.Conv2d(16 * width, 16 * width, 1)
        self.conv6_1 = nn.Conv2d(16 * width, 4 * width, 1)
        self.conv6_2 = nn.Conv2d(4 * width, 8 * width, 3, stride=2, padding=1)
        self.conv7_1 = nn.Conv2d(8 * width, 2 * width, 1)
        self.conv7_2 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        for name, mult, scale in _NORMS:
            self.add_module(name, L2Norm(mult * width, scale))
        for i, (name, mult) in enumerate(_HEADS):
            classes = _FIRST_HEAD_CLASSES if i == 0 else 2
            self.add_module(f"{name}_mbox_conf", nn.Conv2d(mult * width, classes, 3, padding=1))
            self.add_module(f"{name}_mbox_loc", nn.Conv2d(mult * width, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Only the stages that feed a head are kept, and each ReLU overwrites its conv's output: at
        # 640x360 the first stage alone is 30 MB an image, and on a new video this pass ran at the
        # same time as the VAE encoder's (the request's GPU memory peak).
        normed = []
        h = x
        for index, (_, names) in enumerate(_VGG_STAGES):
            for name in names:
                h = F.relu(self.get_submodule(name)(h), inplace=True)
            if index >= len(_VGG_STAGES) - len(_NORMS):
                normed.append(h)
            h = F.max_pool2d(h, 2, 2)
        sources = [self.get_submodule(name)(f) for (name, _, _), f in zip(_NORMS, normed)]
        h = F.relu(self.fc7(F.relu(self.fc6(h))))
        sources.append(h)
        h = F.relu(self.conv6_2(F.relu(self.conv6_1(h))))
        sources.append(h)
        h = F.relu(self.conv7_2(F.relu(self.conv7_1(h))))
        sources.append(h)

        outputs = []
        for (name, _), feature in zip(_HEADS, sources):
            conf = self.get_submodule(f"{name}_mbox_conf")(feature)
            loc = self.get_submodule(f"{name}_mbox_loc")(feature)
            outputs.append((conf, loc))
        # "Max-out background": the finest head predicts three background scores to cut the
        # false positives of its many small anchors; only the largest one competes with the face.
        conf, loc = outputs[0]
        background = conf[:, :-1].amax(dim=1, keepdim=True)
        outputs[0] = (torch.cat([background, conf[:, -1:]], dim=1), loc)
        return outputs


def build(size: str = "full") -> S3FD:
    """A randomly initialised S3FD in eval mode: "full" (checkpoint shapes) or "tiny" (tests)."""
    if size not in WIDTHS:
        raise ValueError(f"size must be one of {sorted(WIDTHS)}, got {size!r}")
    return S3FD(WIDTHS[size]).eval()


def load(path: str | Path, device: str | torch.device = "cpu") -> S3FD:
    """Load an S3FD state dict (.pth or .safetensors, any width) strictly, in eval mode on `device`.

    The width is read from the file, so the public checkpoint and tiny test files both load.
    Raises WeightsFileError naming the file when it is unreadable or is not an S3FD state dict.
    """
    state = load_state_dict(path)
    first = state.get("conv1_1.weight")
    if first is None or first.ndim != 4:
        raise WeightsFileError(path, "not an S3FD state dict (no 4-d conv1_1.weight)")
    with torch.device("meta"):
        model = S3FD(width=first.shape[0])
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsFileError(path, f"does not fit S3FD(width={first.shape[0]}): {e}") from e
    logger.info("S3FD width %d loaded from %s", model.width, path)
    return model.to(device).eval()


def nms(boxes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS over [k,5] (x1,y1,x2,y2,score); indices kept, highest score first.

    Areas and overlaps count "+1" pixels, as the reference does: a box overlapping a kept box by
    IoU > `iou_threshold` is dropped. The IoU of every pair is computed at once (k is capped at
    `_MAX_NMS_INPUT` by `decode_detections`), so the greedy pass is one cheap step per box.
    """
    x1, y1, x2, y2, scores = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    inter_w = np.maximum(0.0, np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1) + 1)
    inter_h = np.maximum(0.0, np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1) + 1)
    inter = inter_w * inter_h
    overlapping = inter / (areas[:, None] + areas - inter) > iou_threshold
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for best in np.argsort(-scores, kind="stable"):
        if not suppressed[best]:
            keep.append(best)
            suppressed |= overlapping[best]
    return np.asarray(keep, dtype=np.int64)


def decode_detections(
    outputs: HeadOutputs,
    *,
    scale_xy: tuple[float, float] = (1.0, 1.0),
    score_threshold: float = 0.5,
    nms_iou: float = 0.3,
    candidate_threshold: float = 0.05,
) -> list[np.ndarray]:
    """Turn raw head outputs into per-image face boxes [k,5] (x1,y1,x2,y2,score), best first.

    `scale_xy` is (network input width / frame width, network input height / frame height); boxes
    are divided by it to land in frame pixels.

    The reference runs NMS over every candidate above `candidate_threshold` and then keeps scores
    above `score_threshold`. Greedy NMS never lets a lower score suppress a higher one, so running
    it only over scores above the larger of the two thresholds gives the same boxes, with a handful
    of candidates instead of thousands. For the same reason only the `_MAX_NMS_INPUT` best
    candidates of an image enter NMS, chosen on the device, so only those are decoded and copied
    to the host whatever the number above the threshold.
    """
    threshold = max(score_threshold, candidate_threshold)
    batch = outputs[0][0].shape[0]
    # Every anchor of every level, flattened per image: probability, level, y, x.
    probs, offsets, anchors = [], [], []
    for level, (conf, loc) in enumerate(outputs):
        stride = 2 ** (level + 2)
        height, width = conf.shape[-2:]
        # fp32: in fp16 a 4K frame's coordinates would be rounded to 2-4 px.
        probs.append(torch.softmax(conf.float(), dim=1)[:, 1].reshape(batch, -1))
        offsets.append(loc.float().reshape(batch, 4, -1))
        y, x = torch.meshgrid(
            torch.arange(height, device=conf.device), torch.arange(width, device=conf.device), indexing="ij"
        )
        centres = torch.stack([x.reshape(-1), y.reshape(-1)], dim=1).float() * stride + stride / 2
        anchors.append(torch.cat([centres, torch.full_like(centres[:, :1], _ANCHOR_PER_STRIDE * stride)], dim=1))
    prob = torch.cat(probs, dim=1)
    loc = torch.cat(offsets, dim=2)
    anchor = torch.cat(anchors)
    k = min(_MAX_NMS_INPUT, prob.shape[1])
    best, index = prob.topk(k, dim=1)
    picked = loc.gather(2, index[:, None, :].expand(-1, 4, -1))  # [b, 4, k]
    centre, side = anchor[index, :2], anchor[index, 2]
    cx = centre[..., 0] + picked[:, 0] * _VARIANCES[0] * side
    cy = centre[..., 1] + picked[:, 1] * _VARIANCES[0] * side
    w = side * torch.exp(picked[:, 2] * _VARIANCES[1])
    h = side * torch.exp(picked[:, 3] * _VARIANCES[1])
    sx, sy = scale_xy
    corners = [(cx - w / 2) / sx, (cy - h / 2) / sy, (cx + w / 2) / sx, (cy + h / 2) / sy]
    boxes = torch.stack([*corners, best], dim=2).cpu().numpy()  # [b, k, 5]
    results = []
    for mine in boxes:
        mine = mine[mine[:, 4] > threshold]
        results.append(mine[nms(mine, nms_iou)].astype(np.float32))
    return results


@torch.inference_mode()
def detect_faces(
    model: nn.Module,
    frames_bgr: np.ndarray | Sequence[np.ndarray | torch.Tensor],
    *,
    scale: float = 1.0,
    score_threshold: float = 0.5,
    nms_iou: float = 0.3,
    candidate_threshold: float = 0.05,
) -> list[np.ndarray]:
    """Detect faces in a batch of BGR frames (uint8 `[B,H,W,3]`, or a sequence of same-size
    `[H,W,3]` frames, numpy arrays uploaded one by one without a host-side copy or tensors already
    on the device), in one forward pass.

    Returns one float32 array [k,5] (x1,y1,x2,y2,score) per frame, in frame pixels, highest score
    first (k may be 0). `scale` resizes the frames before the network (antialiased when shrinking);
    S3FD's cost is linear in pixels and talking-head faces are large: 0.5 costs a quarter and leaves
    a 300 px face at 150 px, well inside the anchors' 16-512 px. The batch runs on the model's
    device and dtype in one pass: callers size it to fit memory.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if len(frames_bgr) == 0:
        return []
    shape = tuple(frames_bgr[0].shape)
    if any(f.dtype not in (np.uint8, torch.uint8) or tuple(f.shape) != shape or len(shape) != 3 or shape[-1] != 3 for f in frames_bgr):
        raise ValueError(f"frames must be uint8 [B,H,W,3] (or [H,W,3] each, one size), got {frames_bgr[0].dtype} {list(shape)} first")
    weight = next(model.parameters())
    # Upload uint8 (4x less traffic than float), then convert and resize on the device.
    x = torch.empty((len(frames_bgr), *shape), dtype=torch.uint8, device=weight.device)
    for row, frame in zip(x, frames_bgr):
        row.copy_(frame if isinstance(frame, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frame)))
    x = x.permute(0, 3, 1, 2).flip(1).float()
    height, width = x.shape[-2:]
    if scale != 1.0:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1.0)
    mean = torch.tensor(_MEAN, device=x.device).view(1, 3, 1, 1)
    scale_xy = (x.shape[-1] / width, x.shape[-2] / height)
    # The pooling layers need 32 px a side: pad smaller inputs with the mean colour (0 after the
    # subtraction) on the right and bottom, which leaves coordinates as they are.
    pad_w, pad_h = max(0, MIN_INPUT_SIDE - x.shape[-1]), max(0, MIN_INPUT_SIDE - x.shape[-2])
    x = F.pad(x - mean, (0, pad_w, 0, pad_h))
    outputs = model(x.to(weight.dtype))
    return decode_detections(
        outputs,
        scale_xy=scale_xy,
        score_threshold=score_threshold,
        nms_iou=nms_iou,
        candidate_threshold=candidate_threshold,
    )
