"""Nested U-Net (U-Net++).

Zhou Z., Siddiquee M.M.R., Tajbakhsh N., Liang J. "UNet++: A Nested U-Net Architecture
for Medical Image Segmentation." DLMIA 2018, arXiv:1807.10165.

Node X^{i,j} (``x_i_j``; i = depth, j = position along the skip pathway) is
``conv_i_j([X^{i,0}, ..., X^{i,j-1}, up(X^{i+1,j-1})])``: the dense, nested skip
pathways of the paper's Fig. 1. With deep supervision a 1x1 head sits on every
X^{0,j}, j >= 1.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBlock, conv, pad_to_multiple, pool, up2


class UNetPlusPlus(nn.Module):
    """U-Net++ returning logits (B, out_channels, H, W) for any H, W (with ``spatial_dims=3``,
    (B, out_channels, D, H, W): see ``blocks``).

    ``features`` gives the width at each depth (len(features) = number of levels L;
    the input is padded to a multiple of 2^(L-1) and the output cropped back).
    ``forward`` always returns one tensor: the mean of the deep-supervision heads when
    ``deep_supervision`` is on, else the last head. ``forward_heads`` returns the list of
    head logits [X^{0,1}, ..., X^{0,L-1}] for the deep-supervision loss.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, features=(16, 32, 64, 128, 256), deep_supervision: bool = False, spatial_dims: int = 2):
        super().__init__()
        self.levels = len(features)
        self.deep_supervision = deep_supervision
        self.pool = pool(spatial_dims)
        self.blocks = nn.ModuleDict()
        for i in range(self.levels):
            for j in range(self.levels - i):
                in_ch = (in_channels if i == 0 else features[i - 1]) if j == 0 else features[i] * j + features[i + 1]
                self.blocks[f"conv_{i}_{j}"] = ConvBlock(in_ch, features[i], dims=spatial_dims)
        n_heads = self.levels - 1
        self.heads = nn.ModuleList(conv(spatial_dims, features[0], out_channels, 1) for _ in range(n_heads if deep_supervision else 1))

    @property
    def multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def _nodes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns [X^{0,1}, ..., X^{0,L-1}]."""
        grid: dict[tuple[int, int], torch.Tensor] = {}
        # Column j = 0: the encoder backbone.
        grid[(0, 0)] = self.blocks["conv_0_0"](x)
        for i in range(1, self.levels):
            grid[(i, 0)] = self.blocks[f"conv_{i}_0"](self.pool(grid[(i - 1, 0)]))
        # Nested skip pathways: X^{i,j} for j >= 1.
        for j in range(1, self.levels):
            for i in range(self.levels - j):
                skips = [grid[(i, k)] for k in range(j)]
                grid[(i, j)] = self.blocks[f"conv_{i}_{j}"](torch.cat([*skips, up2(grid[(i + 1, j - 1)])], dim=1))
        return [grid[(0, j)] for j in range(1, self.levels)]

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, (h, w) = pad_to_multiple(x, self.multiple)
        nodes = self._nodes(x)
        outs = [head(n) for head, n in zip(self.heads, nodes, strict=False)] if self.deep_supervision else [self.heads[0](nodes[-1])]
        return [o[..., :h, :w] for o in outs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.forward_heads(x)
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)
