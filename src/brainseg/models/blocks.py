"""Building blocks shared by both networks, in 2D (slices) or 3D (stacks of slices).

The 3D networks pool and upsample in-plane only (kernel (1, 2, 2)), as nnU-Net does along a
coarse axis: the LGG volumes have thick slices (and the BraTS volumes are resampled from
them), so the slice axis keeps its resolution and 3x3x3 convolutions give every level a
growing view across slices. With in-plane pooling a 2D network's weights map one to one onto
the 3D network (``inflate_2d``), which then starts as exactly the 2D network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv(dims: int, in_ch: int, out_ch: int, kernel: int, bias: bool = True) -> nn.Module:
    """A ``kernel``-sized convolution (``kernel`` along every axis), padded to keep the size."""
    cls = nn.Conv3d if dims == 3 else nn.Conv2d
    return cls(in_ch, out_ch, kernel, padding=kernel // 2, bias=bias)


def norm(dims: int, ch: int) -> nn.Module:
    return nn.BatchNorm3d(ch) if dims == 3 else nn.BatchNorm2d(ch)


def pool(dims: int) -> nn.Module:
    """2x max pooling in-plane (never along the slice axis)."""
    return nn.MaxPool3d((1, 2, 2)) if dims == 3 else nn.MaxPool2d(2)


class ConvBlock(nn.Sequential):
    """(conv 3x3[x3] -> BatchNorm -> ReLU) x 2, the VGG block of U-Net and U-Net++."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None, dims: int = 2):
        mid_ch = mid_ch or out_ch
        super().__init__(
            conv(dims, in_ch, mid_ch, 3, bias=False),
            norm(dims, mid_ch),
            nn.ReLU(inplace=True),
            conv(dims, mid_ch, out_ch, 3, bias=False),
            norm(dims, out_ch),
            nn.ReLU(inplace=True),
        )


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (B, C, [D,] H, W) at the bottom/right to multiples of ``multiple``; returns the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x, (h, w)


def up2(x: torch.Tensor) -> torch.Tensor:
    """2x in-plane upsampling, bilinear (no checkerboard artefacts of transposed convolutions);
    for (B, C, D, H, W) the slice axis is kept."""
    if x.ndim == 5:
        return F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="trilinear", align_corners=False)
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def inflate_2d(theirs: dict, ours: dict) -> dict:
    """A 2D network's weights -> the same network in 3D (I3D's inflation, centre-initialised):
    every 2D kernel becomes the middle slice of its 3D kernel and the other slices are zero, so
    the 3D network starts as exactly the 2D network applied slice by slice and learns what the
    neighbouring slices add. Tensors of the same shape (BatchNorm, biases) are taken as they are."""
    out = dict(theirs)
    for key, w in theirs.items():
        if key in ours and w.ndim == 4 and ours[key].ndim == 5 and ours[key].shape[:2] == w.shape[:2] and ours[key].shape[3:] == w.shape[2:]:
            grown = torch.zeros_like(ours[key])
            grown[:, :, ours[key].shape[2] // 2] = w
            out[key] = grown
    return out
