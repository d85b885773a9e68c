"""Fit the handler's features detector (``handler.ood.Detector``) for any model, from the user's images.

As ``scripts.train.ood`` does for fashion_cnn: class-conditional Gaussians with a tied covariance per layer
of the embedding (Lee et al. 2018), the energy of the logits, and, when the spec canonicalises photos, the
raw-image signals; a class-balanced logistic regression on the standardised parts (and their squares)
tells the user's images from synthetic outliers made from them (``scripts.byo.outliers``).  Two things
differ because a user's folder may be small and its model wide:

- the covariance is shrunk towards a multiple of the identity by the Ledoit-Wolf estimate of the right
  amount (a 512-dimensional layer from a few hundred images is singular without it);
- class means are kept only for the classes the folder has (a 1000-class model may be archived with
  images of a few of its classes).

The threshold is set on images the detector was not fitted on (the calibration part's other half).
"""

from __future__ import annotations

import numpy as np
import torch

from handler.canonical import SIGNALS
from handler.ood import Detector, Layer, OODSpec
from scripts.train import ood


def ledoit_wolf(centred: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The shrunk covariance of centred rows (n, p), float64, and the shrinkage used (Ledoit & Wolf 2004)."""
    n, p = centred.shape
    s = centred.T @ centred / n
    mu = float(s.trace()) / p
    eye = torch.eye(p, dtype=s.dtype)
    delta = float(((s - mu * eye) ** 2).sum()) / p
    if delta <= 0.0 or mu <= 0.0:
        return (mu if mu > 0 else 1.0) * eye, 1.0
    norms = (centred**2).sum(dim=1)
    beta_bar = float((norms**2).sum() - 2.0 * ((centred @ s) * centred).sum() + n * (s**2).sum()) / (n * n * p)
    shrink = min(max(beta_bar, 0.0), delta) / delta
    return shrink * mu * eye + (1.0 - shrink) * s, shrink


def fit_layers(embedding: torch.Tensor, labels: np.ndarray, slices) -> tuple[tuple[Layer, ...], dict[str, float]]:
    """Per layer: the means of the classes present and the shrunk tied precision matrix; and each shrinkage."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    row = {int(k): i for i, k in enumerate(present)}
    index = torch.as_tensor([row[int(k)] for k in labels])
    layers, shrinkage = [], {}
    for name, start, stop in slices:
        e = embedding[:, start:stop].double()
        means = torch.stack([e[torch.as_tensor(labels == k)].mean(0) for k in present])
        cov, shrink = ledoit_wolf(e - means[index])
        layers.append(Layer(name, start, stop, means.float(), torch.linalg.inv(cov).float()))
        shrinkage[name] = round(shrink, 4)
    return tuple(layers), shrinkage


def part_names(layers, with_signals: bool) -> tuple[str, ...]:
    return ("energy", *(f"mahalanobis_{layer.name}" for layer in layers), *(SIGNALS if with_signals else ()))


def fit(temperature: float, layers, inside: tuple, outside: tuple) -> Detector:
    """The combined detector (no threshold yet) from (logits, embedding, signals or None) of both sets."""
    names = part_names(layers, inside[2] is not None)
    scaffold = Detector(OODSpec("features"), temperature, layers, names)
    x_in = ood.parts_matrix(scaffold, *inside, names)
    x_out = ood.parts_matrix(scaffold, *outside, names)
    center, scale, weights, bias = ood.fit_logistic(x_in, x_out)
    return Detector(OODSpec("features"), temperature, layers, names, center, scale, weights, bias)


def scores(detector: Detector, logits, embedding, signals) -> torch.Tensor:
    return detector.score(detector.parts(logits, embedding, signals))


def with_threshold(detector: Detector, threshold: float, false_alarm_rate: float) -> Detector:
    spec = OODSpec("features", round(float(threshold), 5), false_alarm_rate)
    return Detector(spec, detector.temperature, detector.layers, detector.inputs, detector.center, detector.scale,
                    detector.weights, detector.bias)
