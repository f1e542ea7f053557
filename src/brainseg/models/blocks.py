"""Building blocks shared by both networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Sequential):
    """(conv 3x3 -> BatchNorm -> ReLU) x 2, the VGG block of U-Net and U-Net++."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None):
        mid_ch = mid_ch or out_ch
        super().__init__(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (B, C, H, W) at the bottom/right to multiples of ``multiple``; returns the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x, (h, w)


def up2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x upsampling (no checkerboard artefacts of transposed convolutions)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
