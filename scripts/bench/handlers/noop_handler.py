"""Benchmark only: a handler that does no work, so its throughput is TorchServe's own ceiling.

Every request of a batch is answered with the same small JSON document, without
reading the body, decoding an image or loading a model. What remains is the
frontend (HTTP, token check, batching, queueing) and the worker protocol.
"""

import json


class NoopHandler:
    def initialize(self, context):
        self.answer = json.dumps({"label": "noop", "confidence": 1.0})
        self.initialized = True

    def handle(self, data, context):
        return [self.answer] * len(data)
