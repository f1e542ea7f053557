"""Attention U-Net.

Oktay O., Schlemper J., Le Folgoc L., et al. "Attention U-Net: Learning Where to Look
for the Pancreas." MIDL 2018, arXiv:1804.03999.

A U-Net whose skip connections pass through additive attention gates (paper Fig. 2):
``alpha = sigmoid(psi(relu(W_x x_l + W_g g)))``, with the gating signal g taken from the
coarser decoder level, and the skip features multiplied by alpha before concatenation.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBlock, conv, norm, pad_to_multiple, pool, up2


class AttentionGate(nn.Module):
    """Additive attention gate; ``x`` (skip, B x F_l x [D x] H x W), ``g`` (gate, same size)."""

    def __init__(self, f_l: int, f_g: int, f_int: int, dims: int = 2):
        super().__init__()
        self.w_x = nn.Sequential(conv(dims, f_l, f_int, 1, bias=False), norm(dims, f_int))
        self.w_g = nn.Sequential(conv(dims, f_g, f_int, 1, bias=True), norm(dims, f_int))
        self.psi = nn.Sequential(conv(dims, f_int, 1, 1, bias=True), norm(dims, 1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        alpha = self.psi(self.relu(self.w_x(x) + self.w_g(g)))  # (B, 1, H, W) attention coefficients
        return x * alpha


class AttentionUNet(nn.Module):
    """Attention U-Net returning logits (B, out_channels, H, W) for any H, W; with
    ``spatial_dims=3``, (B, out_channels, D, H, W) for any D (``blocks``: in-plane pooling).

    ``features`` gives the width at each of the L levels; the input is padded to a multiple of
    2^(L-1) and the output cropped back (``blocks.pad_to_multiple``). ``deep_supervision`` is
    accepted so that every network in ``models.MODELS`` has the same constructor, and ignored:
    there is one head.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, features=(16, 32, 64, 128, 256), deep_supervision: bool = False, spatial_dims: int = 2):
        super().__init__()
        d = spatial_dims
        self.levels = len(features)
        self.pool = pool(d)
        self.encoder = nn.ModuleList(ConvBlock(in_channels if i == 0 else features[i - 1], features[i], dims=d) for i in range(self.levels))
        # Decoder level i (from coarse to fine): upsample features[i+1] -> conv to features[i],
        # gate the skip of level i with it, concatenate, ConvBlock.
        self.up_convs = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(self.levels - 1)):
            self.up_convs.append(nn.Sequential(conv(d, features[i + 1], features[i], 3, bias=False), norm(d, features[i]), nn.ReLU(inplace=True)))
            self.gates.append(AttentionGate(features[i], features[i], max(features[i] // 2, 1), dims=d))
            self.decoder.append(ConvBlock(2 * features[i], features[i], dims=d))
        self.head = conv(d, features[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.forward(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, self.multiple)
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, gate, dec in zip(self.up_convs, self.gates, self.decoder, strict=False):
            skip = skips.pop()
            g = up(up2(x))
            x = dec(torch.cat([gate(skip, g), g], dim=1))
        return self.head(x)[..., :h, :w]
