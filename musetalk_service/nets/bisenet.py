"""BiSeNet face parsing (19 CelebAMask-HQ classes), state-dict compatible with `79999_iter.pth`.

Architecture of zllrunning/face-parsing.PyTorch (spec §7): a ResNet-18 context path giving features
at 1/8, 1/16 and 1/32; attention refinement modules on the 1/16 and 1/32 features plus a global
average context; the 1/8 backbone feature stands in for the spatial path; a feature fusion module;
three heads. Module and parameter names follow that checkpoint so it loads strictly.

`width` scales every channel count (64 in the real network: 64/128/256/512 in the backbone), so a
tiny variant with the same keys exists for tests; `load` reads the width back from the shapes.
Only the main head is run: the two auxiliary heads were for training and are kept for the keys.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from musetalk_service.nets.loading import StateDict, build_and_load, load_state_dict

logger = logging.getLogger(__name__)

N_CLASSES = 19
WIDTHS = {"full": 64, "tiny": 8}


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))


class ResNet18(nn.Module):
    """ResNet-18 trunk without the classifier; returns the 1/8, 1/16 and 1/32 features."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = _stage(width, width, 1)
        self.layer2 = _stage(width, 2 * width, 2)
        self.layer3 = _stage(2 * width, 4 * width, 2)
        self.layer4 = _stage(4 * width, 8 * width, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    """Conv, then channel attention from the globally pooled feature (1x1 conv, BN, sigmoid)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        attention = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * attention


class ContextPath(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        mid = 2 * width
        self.resnet = ResNet18(width)
        self.arm16 = AttentionRefinementModule(4 * width, mid)
        self.arm32 = AttentionRefinementModule(8 * width, mid)
        self.conv_head32 = ConvBNReLU(mid, mid)
        self.conv_head16 = ConvBNReLU(mid, mid)
        self.conv_avg = ConvBNReLU(8 * width, mid, kernel=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        context = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))  # broadcasts over the 1/32 grid
        up32 = F.interpolate(self.arm32(feat32) + context, size=feat16.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(feat16) + up32, size=feat8.shape[2:], mode="nearest")
        up16 = self.conv_head16(up16)
        return feat8, up16


class FeatureFusionModule(nn.Module):
    """Concatenate, 1x1 conv, then add a squeeze-excitation reweighting of the result."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, kernel=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat + feat * attention


class BiSeNetOutput(nn.Module):
    def __init__(self, cin: int, mid: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face parser: ImageNet-normalised RGB [B,3,H,W] -> class logits [B,19,H,W] (main head only)."""

    def __init__(self, width: int = 64, n_classes: int = N_CLASSES):
        super().__init__()
        self.cp = ContextPath(width)
        self.ffm = FeatureFusionModule(4 * width, 4 * width)
        self.conv_out = BiSeNetOutput(4 * width, 4 * width, n_classes)
        # Auxiliary heads on the 1/8 and 1/16 context features: training only, never run here.
        self.conv_out16 = BiSeNetOutput(2 * width, width, n_classes)
        self.conv_out32 = BiSeNetOutput(2 * width, width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat8, context8 = self.cp(x)
        logits = self.conv_out(self.ffm(feat8, context8))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)


def build(size: Literal["tiny", "full"] = "full") -> BiSeNet:
    """A randomly initialised BiSeNet in eval mode: "full" (13.3 M parameters, the real one) or "tiny" (tests)."""
    if size not in WIDTHS:
        raise ValueError(f"size must be one of {sorted(WIDTHS)}, got {size!r}")
    return BiSeNet(width=WIDTHS[size]).eval()


def load(path: str | Path, device: str | torch.device = "cpu") -> BiSeNet:
    """Load a BiSeNet state dict (79999_iter.pth or its safetensors form), width and classes read from its shapes.

    Raises WeightsFileError naming the file if it is unreadable or does not fit the architecture.
    """
    state = load_state_dict(path)
    width, n_classes = _infer_dims(state)
    logger.debug("BiSeNet %s: width %s, %s classes", path, width, n_classes)
    model = build_and_load(lambda: BiSeNet(width, n_classes), state, path)
    return model.to(device).eval()


def _infer_dims(state: StateDict) -> tuple[int, int]:
    # Missing keys leave the defaults; the strict load that follows then names what is missing.
    stem = state.get("cp.resnet.conv1.weight")
    head = state.get("conv_out.conv_out.weight")
    width = stem.shape[0] if stem is not None and stem.dim() == 4 else WIDTHS["full"]
    n_classes = head.shape[0] if head is not None and head.dim() == 4 else N_CLASSES
    return int(width), int(n_classes)
