"""Prediction-quality and per-stage metrics, emitted through TorchServe's metrics cache.

In ``metrics_mode=prometheus`` the frontend publishes only metrics declared in the
``metrics.yaml`` named by ``metrics_config``; the names and dimension lists below
must match that file (``tests/unit/test_metrics_yaml.py`` checks they do).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter

from ts.metrics.metric_type_enum import MetricTypes

# TorchServe's metric lines are logged by this logger (ts.metrics.caching_metric); so are ours.
_ts_logger = logging.getLogger("ts.metrics.caching_metric")

PREDICTIONS = ("PredictionsPerLabel", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion", "Label"])
CONFIDENCE = ("TopConfidence", MetricTypes.HISTOGRAM, "Ratio", ["ModelName", "ModelVersion"])
UNCERTAIN = ("UncertainPredictions", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion"])
OUT_OF_DISTRIBUTION = ("OutOfDistributionPredictions", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion"])
DISAGREEMENT = ("TTADisagreement", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion"])
AUGMENTED = ("TTAAugmented", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion"])  # answers that got the extra views
REJECTED = ("RejectedRequests", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion", "Reason"])
STAGE_LATENCY = ("StageLatency", MetricTypes.HISTOGRAM, "Seconds", ["ModelName", "ModelVersion", "Stage"])
RECORDED = ("RecordedAnswers", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion"])  # written to the spool
RECORD_LOST = ("RecordLost", MetricTypes.COUNTER, "Count", ["ModelName", "ModelVersion", "Reason"])  # answers not recorded
ALL = (PREDICTIONS, CONFIDENCE, UNCERTAIN, OUT_OF_DISTRIBUTION, DISAGREEMENT, AUGMENTED, REJECTED, STAGE_LATENCY,
       RECORDED, RECORD_LOST)


class QualityMetrics:
    """Emitter bound to one model version: a batch's metric updates go out as ONE write.

    TorchServe's own ``add_or_update`` logs each update as a line of its own on the worker's
    stdout, and its stream handler flushes after every record: a batch of 8 answers costs ~12
    writes. Here each update is formatted exactly as TorchServe's ``CachingMetric.emit_metrics``
    does (the frontend reads the same ``[METRICS]...`` lines) and ``flush()`` logs them together.
    """

    def __init__(self, cache, model_name: str, version: str):
        self.cache = cache
        self.base = [model_name, version]
        self.pending: list[str] = []
        self._handles: dict[str, object] = {}
        self._host = socket.gethostname()

    def _handle(self, metric):
        name, mtype, unit, dim_names = metric
        handle = self._handles.get(name)
        if handle is None:
            try:
                handle = self.cache.get_metric(name, mtype)
            except Exception:  # not declared: add it so backend logs still carry it
                handle = self.cache.add_metric_to_cache(name, unit, list(dim_names), mtype)
            self._handles[name] = handle
        return handle

    def _emit(self, metric, value, *dims: str) -> None:
        if self.cache is None:
            return
        handle = self._handle(metric)
        values = [*self.base, *dims]
        if len(values) != len(handle.dimension_names):
            raise ValueError(f"{handle.metric_name}: dimension values {values} do not match {handle.dimension_names}")
        dimensions = ",".join(f"{k}:{v}" for k, v in zip(handle.dimension_names, values))
        self.pending.append(f"[METRICS]{handle.metric_name}.{handle.unit}:{value}|#{dimensions}|"
                            f"#type:{handle.metric_type.name}|#hostname:{self._host},{int(time.time())}")

    def flush(self) -> None:
        """Write every pending update in one log record (one line each)."""
        if self.pending:
            lines, self.pending = self.pending, []
            _ts_logger.info("\n".join(lines))

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

    def start(self, labels, reasons, record_reasons=()) -> None:
        """Every counter alerts read, at 0 for every known label value, when a worker starts: a series that first
        appears with its first event is invisible to ``rate()``/``increase()`` (no earlier sample) and makes
        ``absent()`` fire on a healthy, fresh server. Histograms are left alone (a 0 would be an observation)."""
        for label in labels:
            self._emit(PREDICTIONS, 0, label)
        for metric in (UNCERTAIN, OUT_OF_DISTRIBUTION, DISAGREEMENT, AUGMENTED):
            self._emit(metric, 0)
        for reason in reasons:
            self._emit(REJECTED, 0, reason)
        if record_reasons:  # recording is on in this worker
            self._emit(RECORDED, 0)
            for reason in record_reasons:
                self._emit(RECORD_LOST, 0, reason)
        self.flush()

    def recording(self, recorded: int, lost: Counter) -> None:
        if recorded:
            self._emit(RECORDED, recorded)
        for reason, count in lost.items():
            self._emit(RECORD_LOST, count, reason)

    def rejected(self, reasons: list[str]) -> None:
        for reason, count in Counter(reasons).items():
            self._emit(REJECTED, count, reason)

    def stages(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self._emit(STAGE_LATENCY, round(value, 6), stage)
