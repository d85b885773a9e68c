"""The default classifier: a small VGG-style CNN for 1x28x28 inputs, 10 classes.

The scripted model offers, besides ``forward(x) -> logits``:

- ``forward_features(x) -> (logits, embedding, feature_map)`` in ONE pass: the
  embedding concatenates the globally averaged output of every convolutional block
  and the penultimate layer (what the out-of-distribution detector reads, Lee et al.
  2018 use several layers), the feature map is the last convolutional block's output
  before pooling (7x7), the layer Grad-CAM explains;
- ``head(feature_map) -> logits``: the rest of the network from that feature map, so
  a gradient of a logit with respect to the feature map needs no hooks.
"""

from __future__ import annotations

import torch
from torch import nn


def _convs(in_ch: int, out_ch: int) -> list[nn.Module]:
    """Two 3x3 conv + BatchNorm + ReLU layers (VGG's unit, without its pooling)."""
    return [
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class FashionCNN(nn.Module):
    """28x28 -> 14 -> 7 (feature map) -> 3, then dropout + a two-layer classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths=(32, 64, 128), dropout: float = 0.3):
        super().__init__()
        blocks, ch = [], in_channels
        for i, width in enumerate(widths):
            layers = _convs(ch, width)
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            ch = width
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.Sequential(nn.MaxPool2d(2), nn.Flatten())
        self.hidden = nn.Sequential(nn.Dropout(dropout), nn.Linear(ch * 3 * 3, 128), nn.ReLU(inplace=True))
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    @torch.jit.export
    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.pool(feature_map)))

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled: list[torch.Tensor] = []
        for block in self.blocks:
            x = block(x)
            pooled.append(x.mean(dim=(2, 3)))
        penultimate = self.hidden(self.pool(x))
        pooled.append(penultimate)
        return self.out(penultimate), torch.cat(pooled, dim=1), x
