"""The baseline users start from: a TorchServe image-classifier handler written the common tutorial way.

Benchmark only (scripts/bench/run.py), never served. Per request it decodes the image
with PIL, runs a torchvision ``Compose`` on it, and calls the model once per
image **and once per TTA view** on a batch of one, then averages the views'
probabilities. That is what most "add TTA to your handler" examples do.

So that the benchmark compares designs and not models, it serves the same model
with the same answers as ``handler/`` would give: it reads the same ``spec.json``
(mean/std, size, the TTA views, temperature, class names; the ``handler:`` section
of model-config.yaml overrides ``tta``) and honours the ``X-TTA: off`` header. It
supports the spec subset the benchmark uses: 1- or 3-channel input resized to the
input size (Fashion CNN), views ``identity``, ``hflip``, ``vflip`` and
``shift(dx,dy)``.

Like the tutorials, it leaves torch's thread count alone (torch's default: all
cores, in every worker) and runs the model as exported. With ``naive: {threads:
auto, optimize: true}`` in model-config.yaml it sets cores // maxWorkers threads
and freezes the model with torch's inference passes, as ``handler/`` does, so the
benchmark can tell the effect of batching from the effect of those two settings.
"""

import io
import json
import os
import re

import torch
from PIL import Image
from torchvision import transforms
from ts.torch_handler.base_handler import BaseHandler

_SHIFT = re.compile(r"^shift\((-?\d+),\s*(-?\d+)\)$")
_ZOOM = re.compile(r"^zoom\((\d+(?:\.\d+)?)\)$")


class NaiveTTAHandler(BaseHandler):
    def initialize(self, context):
        super().initialize(context)  # torch.jit.load of the serialized .pt, model.eval()
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "spec.json")) as f:
            self.spec = json.load(f)
        config = getattr(context, "model_yaml_config", None) or {}
        overrides = config.get("handler") or {}
        if "tta" in overrides:
            self.spec["tta"] = list(overrides["tta"])
        options = config.get("naive") or {}
        if options.get("threads") == "auto":
            workers = int(config.get("maxWorkers") or config.get("minWorkers") or 1)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        if options.get("optimize"):
            self.model = torch.jit.optimize_for_inference(torch.jit.freeze(self.model))
        height, width = self.spec["input_size"]
        self.mode = "L" if self.spec["channels"] == 1 else "RGB"
        self.transform = transforms.Compose([
            transforms.Resize((height, width)),
            transforms.ToTensor(),
            transforms.Normalize(self.spec["mean"], self.spec["std"]),
        ])
        self.fill = tuple(self.spec["background"]) if self.mode == "RGB" else self.spec["background"][0]
        self.initialized = True

    def view(self, image, name):
        """One TTA view of a PIL image."""
        if name == "identity":
            return image
        if name == "hflip":
            return image.transpose(Image.FLIP_LEFT_RIGHT)
        if name == "vflip":
            return image.transpose(Image.FLIP_TOP_BOTTOM)
        match = _SHIFT.match(name)
        if match:
            dx, dy = int(match.group(1)), int(match.group(2))
            return image.transform(image.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy), fillcolor=self.fill)
        match = _ZOOM.match(name)
        if match:  # scale about the centre, the way a person would write it with PIL
            f = float(match.group(1))
            w, h = image.size
            return image.transform(image.size, Image.AFFINE, (1 / f, 0, w / 2 * (1 - 1 / f), 0, 1 / f, h / 2 * (1 - 1 / f)),
                                   resample=Image.BILINEAR, fillcolor=self.fill)
        raise ValueError(f"view {name!r} is not supported by the naive handler")

    def tta_enabled(self, idx):
        headers = {str(k).lower(): v for k, v in (self.context.get_all_request_header(idx) or {}).items()}
        return str(headers.get("x-tta", "on")).lower() not in ("off", "false", "0", "no")

    def preprocess(self, data):
        images = []
        for row in data:
            payload = row.get("data") or row.get("body")
            images.append(Image.open(io.BytesIO(payload)).convert(self.mode))
        return images

    def inference(self, images, *args, **kwargs):
        results = []
        for idx, image in enumerate(images):
            views = self.spec["tta"] if self.tta_enabled(idx) else ["identity"]
            probs = []
            for name in views:
                x = self.transform(self.view(image, name)).unsqueeze(0)
                with torch.inference_mode():
                    logits = self.model(x)
                probs.append(torch.softmax(logits / self.spec["temperature"], dim=1))
            results.append(torch.cat(probs).mean(dim=0))
        return results

    def postprocess(self, results):
        out = []
        names = self.spec["class_names"]
        for probs in results:
            values, indices = torch.topk(probs, k=self.spec["top_k"])
            ranked = [{"label": names[i], "class_index": i, "probability": round(p, 6)}
                      for p, i in zip(values.tolist(), indices.tolist())]
            out.append({"label": ranked[0]["label"], "confidence": ranked[0]["probability"], "top_k": ranked})
        return out
