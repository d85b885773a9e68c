"""The default classifier: a small VGG-style CNN for 1x28x28 inputs, 10 classes."""

from __future__ import annotations

import torch
from torch import nn


def _block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU layers, then 2x2 max-pooling (VGG's unit)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionCNN(nn.Module):
    """28x28 -> 14 -> 7 -> 3 feature maps, then dropout + a two-layer classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths=(32, 64, 128), dropout: float = 0.3):
        super().__init__()
        layers, ch = [], in_channels
        for width in widths:
            layers.append(_block(ch, width))
            ch = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(ch * 3 * 3, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
