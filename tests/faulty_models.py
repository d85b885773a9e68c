"""Classifiers with one deployment fault each, wrapped around a working model: what the doctor
(tests/unit/test_doctor.py) and ``make archive`` (tests/unit/test_byo.py) must refuse by name."""

from __future__ import annotations

import torch
from torch import nn


class TrainedOnUnitRange(nn.Module):
    """Trained on pixels in [0, 1]: normalises internally, so the spec's mean/std is applied twice."""

    def __init__(self, inner, mean: float, std: float):
        super().__init__()
        self.inner, self.mean, self.std = inner, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.mean) / self.std)


class TrainedInverted(nn.Module):
    """Trained on dark objects on white: inverts what it is given before the real model sees it."""

    def __init__(self, inner, mean: float, std: float):
        super().__init__()
        self.inner, self.mean, self.std = inner, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * self.std + self.mean
        return self.inner((1.0 - pixels - self.mean) / self.std)


class DropoutOn(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.drop = inner, nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.drop(x))


class Softmaxed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.inner(x), dim=1)


class Collapsed(nn.Module):
    """A classifier whose bias on class 3 drowns the image's evidence: class 3 for everything, when ``bias``
    exceeds the inner model's logits under every convention it is tried with."""

    def __init__(self, inner, bias: float = 40.0):
        super().__init__()
        self.inner = inner
        self.register_buffer("bias", torch.zeros(10).index_fill_(0, torch.tensor([3]), bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.bias


class Unbatched(nn.Module):
    """Written for one (C, H, W) image: adds the batch dimension itself."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.unsqueeze(0))
