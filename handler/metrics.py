"""Prediction-quality and per-stage metrics, emitted through TorchServe's metrics cache.

In ``metrics_mode=prometheus`` the frontend publishes only metrics declared in the
``metrics.yaml`` named by ``metrics_config``; the names and dimension lists below
must match that file (``tests/unit/test_metrics_yaml.py`` checks they do).
"""

from __future__ import annotations

from collections import Counter

from ts.metrics.metric_type_enum import MetricTypes

PREDICTIONS = ("PredictionsPerLabel", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion", "Label"])
CONFIDENCE = ("TopConfidence", MetricTypes.HISTOGRAM, "Ratio", ["ModelName", "ModelVersion"])
UNCERTAIN = ("UncertainPredictions", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion"])
OUT_OF_DISTRIBUTION = ("OutOfDistributionPredictions", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion"])
DISAGREEMENT = ("TTADisagreement", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion"])
AUGMENTED = ("TTAAugmented", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion"])  # answers that got the extra views
REJECTED = ("RejectedRequests", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion", "Reason"])
STAGE_LATENCY = ("StageLatency", MetricTypes.HISTOGRAM, "Seconds", ["ModelName", "ModelVersion", "Stage"])
ALL = (PREDICTIONS, CONFIDENCE, UNCERTAIN, OUT_OF_DISTRIBUTION, DISAGREEMENT, AUGMENTED, REJECTED, STAGE_LATENCY)


class QualityMetrics:
    """Thin emitter bound to one model version; one log line per metric update."""

    def __init__(self, cache, model_name: str, version: str):
        self.cache = cache
        self.base = [model_name, version]

    def _emit(self, metric, value, *dims: str) -> None:
        if self.cache is None:
            return
        name, mtype, unit, dim_names = metric
        try:
            handle = self.cache.get_metric(name, mtype)
        except Exception:  # not declared: add it so backend logs still carry it
            handle = self.cache.add_metric_to_cache(name, unit, list(dim_names), mtype)
        handle.add_or_update(value, [*self.base, *dims], "")

    def predictions(self, labels: list[str], confidences: list[float], uncertain: int, disagree: int, ood: int = 0,
                    augmented: int = 0) -> None:
        for label, count in Counter(labels).items():
            self._emit(PREDICTIONS, count, label)
        for confidence in confidences:
            self._emit(CONFIDENCE, confidence)
        if uncertain:
            self._emit(UNCERTAIN, uncertain)
        if disagree:
            self._emit(DISAGREEMENT, disagree)
        if ood:
            self._emit(OUT_OF_DISTRIBUTION, ood)
        if augmented:
            self._emit(AUGMENTED, augmented)

    def rejected(self, reasons: list[str]) -> None:
        for reason, count in Counter(reasons).items():
            self._emit(REJECTED, count, reason)

    def stages(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self._emit(STAGE_LATENCY, round(value, 6), stage)
