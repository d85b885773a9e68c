"""TorchServe entry point: a thin BaseHandler; each stage lives in its own module.

- ``handler.request`` / ``handler.preprocess``: request -> image bytes + options -> tensor
  (``handler.v2``: the same for Open Inference Protocol requests, and their answers)
- ``handler.inference``: all TTA views of the whole batch in one forward pass
- ``handler.explain``: heatmaps for the requests on /explanations only (unfrozen model, backward pass)
- ``handler.postprocess``: merged probabilities -> JSON answer
- ``handler.metrics``: prediction-quality and per-stage metrics
- ``handler.record``: every answer appended to the local spool the recorder ingests (when the stack sets it up)

``handle()`` is overridden so that a bad request is answered alone (its own 4xx,
never an exception that fails the batch) and so that ``describe`` / ``explain``
headers act on their own request rather than on the whole batch.
"""

import logging
import time

from ts.torch_handler.base_handler import BaseHandler

from handler import golden
from handler.errors import InternalError, known_reasons
from handler.explain import Explainer, attach
from handler.inference import Policy, infer
from handler.loader import load
from handler.metrics import QualityMetrics
from handler.postprocess import encode, render
from handler.preprocess import prepare
from handler.record import LOSS_REASONS, Recorder
from handler.request import normalise_headers

logger = logging.getLogger(__name__)


class TTAClassifierHandler(BaseHandler):
    def initialize(self, context):
        loaded = load(context)
        self.model, self.device = loaded.model, loaded.device
        self.spec, self.reference = loaded.artifact.spec, loaded.artifact.reference
        self.policy = Policy.from_spec(self.spec, loaded.artifact.ood)
        # The served model (fp32 or int8) answers its own golden inputs; explanations always use the
        # unfrozen fp32 model, which gradients flow through.
        golden.require(loaded.golden, self.model, self.spec, self.policy, self.device)
        self.explainer = Explainer.build(loaded.artifact.model, self.spec, self.policy.fill.to(self.device))
        self.version = str(context.manifest["model"].get("modelVersion", "1.0"))
        self.model_name = context.model_name
        self.quality = QualityMetrics(context.metrics, context.model_name, self.version)
        self.recorder = Recorder.from_env(self.spec, self.model_name, self.version)
        self.quality.start(self.spec.class_names, known_reasons(), LOSS_REASONS if self.recorder else ())
        self.answered = []
        self.initialized = True

    def handle(self, data, context):
        self.context = context
        t0 = time.perf_counter()
        slots = self.preprocess(data)
        t1 = time.perf_counter()
        results = self.inference(slots)
        t2 = time.perf_counter()
        slots, results = self.add_explanations(slots, results)
        t3 = time.perf_counter()
        output = self.postprocess(list(zip(slots, results)))
        if self.recorder is not None:  # never raises: a loss is counted, the answers go out
            self.quality.recording(*self.recorder.record(self.answered, data, context))
        t4 = time.perf_counter()
        stages = {"preprocess": t1 - t0, "inference": t2 - t1, "postprocess": t4 - t3}
        if any(getattr(slot, "explain", False) for slot in slots):  # only batches that asked pay and report it
            stages["explain"] = t3 - t2
        self.quality.stages(stages)
        self.quality.flush()  # the batch's metric lines in one write
        return output

    def preprocess(self, data):
        return [self._prepare_one(idx, item) for idx, item in enumerate(data)]

    def _prepare_one(self, idx, item):
        try:
            return prepare(item, normalise_headers(self.context.get_all_request_header(idx)), self.spec)
        except Exception:  # a bug, not a client error: isolate it to this request
            logger.exception("Unexpected error preparing request %s", self.context.get_request_id(idx))
            return InternalError(f"The server failed on this request (id {self.context.get_request_id(idx)}); "
                                 "it has been logged. Other requests are unaffected.")

    def inference(self, data, *args, **kwargs):
        return infer(self.model, data, self.policy, self.device)

    def add_explanations(self, slots, results):
        return attach(self.explainer, slots, results, self.spec.class_names, self.device, self.context.get_request_id)

    def postprocess(self, data):
        output, labels, confidences, rejected, self.answered = [], [], [], [], []
        uncertain = disagree = ood = augmented = 0
        for idx, (slot, result) in enumerate(data):
            status, phrase, body, answers = render(slot, result, self.spec, self.policy.names, self.version,
                                                   self.model_name)
            payload, content_type, headers = encode(body)
            self.context.set_response_status(status, phrase, idx)
            self.context.set_response_content_type(idx, content_type)
            self.context.set_response_header(idx, "X-Model-Version", self.version)
            for name, value in headers.items():
                self.context.set_response_header(idx, name, value)
            output.append(payload)
            if status != 200:
                rejected.append(slot.reason)
            if getattr(slot, "probe", False):  # readiness probes would skew the label and confidence distributions
                continue
            if answers:
                self.answered.append((idx, slot, result, answers))
            for image, item in zip(result if answers else [], answers):
                labels.append(item["label"])
                confidences.append(item["confidence"])
                uncertain += item["uncertain"]
                ood += item["out_of_distribution"]
                disagree += image.disagree
                augmented += image.n_views > 1
        self.quality.predictions(labels, confidences, uncertain, disagree, ood, augmented)
        self.quality.rejected(rejected)
        return output
