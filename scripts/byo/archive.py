"""From a TorchScript classifier and a labelled folder to a served archive with the same guarantees as fashion_cnn.

    make archive MODEL=path.pt DATA=dir/ NAME=mynet [SPEC=spec.json] [ARCHIVE_ARGS="--ood-data other/"]
    python -m scripts.byo.archive --model path.pt --data dir/ --name mynet [--spec spec.json]

``DATA`` is a class-per-folder tree (``DATA/<class>/<image>``) of images the model did not train on. In order:

1. **doctor** (``scripts.diagnose.doctor``): a model with a fault (the wrong input shape, dropout left on,
   probabilities instead of logits, another normalisation or polarity, collapsed answers) is refused,
   naming the fault and what to fix; its report and figures go to ``build/NAME/doctor/``;
2. **spec**: ``SPEC``, else the one inside the model file, else **proposed** from measurements on the
   user's images (``scripts.byo.propose``: input shape, normalisation, polarity, classes) and written to
   ``build/NAME/spec.proposed.json`` for the user to check;
3. **split** (stratified): a test part (``--test-share``) and a calibration part, itself halved into the
   detector's fit and tune parts;
4. **calibration** on the calibration part, as ``scripts.train.export`` does for fashion_cnn: the softmax
   temperature (NLL) and the "uncertain" threshold (the lowest at which at most ``--max-confidently-wrong``
   of the answers are wrong without being uncertain or flagged);
5. **out-of-distribution detector** for that model (``scripts.byo.features``: its ``forward_features``, or
   its submodules run in order, or its logits), fitted on the fit half and synthetic outliers made from
   it, thresholded on the tune half at ``--false-alarm-rate``;
6. **golden inputs**: three of the user's images (their files as they are) and one synthetic outlier, with
   the answers seen; every worker refuses to start when it answers them differently;
7. **report** on the test part only (accuracy as served, ECE before and after calibration, uncertain,
   confidently wrong and out-of-distribution rates, synthetic outliers and ``--ood-data`` flagged, the
   confusion matrix as a picture): ``build/NAME/report.{md,json}`` and pictures;
8. **archive**: ``build/NAME/NAME.pt`` (the model, its spec, the test part's reference distributions, the
   detector and golden inputs inside), reloaded and checked as a worker does, then ``model_store/NAME.mar``
   (``scripts.deploy.package``, fp32), served with ``make serve MAR=model_store/NAME.mar``.

A refusal exits with status 1 and a message naming the check; nothing is written to the model store.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from tqdm import tqdm

from handler import golden
from handler.errors import RequestError, SpecError
from handler.inference import Policy, classify
from handler.loader import GOLDEN_FILENAME, optimized, read_model
from handler.ood import OOD_FILENAME
from handler.preprocess import bytes_to_input, canonical_image, decode_image, image_to_input
from handler.spec import REFERENCE_FILENAME, SPEC_FILENAME, ModelSpec
from scripts.byo import detector as det
from scripts.byo import folder as folders
from scripts.byo import outliers as synth
from scripts.byo import propose, report
from scripts.byo.features import FeaturesError, read_features
from scripts.deploy import package
from scripts.diagnose import doctor
from scripts.train import ood
from scripts.train.data import REPO
from scripts.train.export import choose_threshold, expected_calibration_error, fit_temperature, reference_stats, share

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
GOLDEN_MAX_BYTES = 256 * 1024  # a larger file is stored as a PNG of its decoded image (golden.json travels in the .pt)


class ArchiveRefused(RuntimeError):
    """The model or its images cannot be archived as they are; ``check`` names what failed."""

    def __init__(self, check: str, message: str):
        super().__init__(message)
        self.check = check


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a TorchScript classifier (.pt) returning logits")
    p.add_argument("--data", type=Path, required=True,
                   help="labelled images the model did not train on: DATA/<class>/<image>")
    p.add_argument("--name", required=True, help="the model's name when served (letters, digits, _ and -)")
    p.add_argument("--spec", type=Path, default=None,
                   help="spec.json (default: the one inside the model file, else proposed from the images)")
    p.add_argument("--version", default="1.0")
    p.add_argument("--test-share", type=share, default=0.5, help="share of each class kept for the report")
    p.add_argument("--false-alarm-rate", type=share, default=0.03,
                   help="share of the user's (unseen) images the out-of-distribution threshold may flag")
    p.add_argument("--max-confidently-wrong", type=share, default=0.05,
                   help="the uncertain threshold is the lowest at which at most this share of calibration answers "
                        "is wrong without being uncertain or flagged")
    p.add_argument("--threshold", type=float, default=None, help="set the uncertain threshold instead of choosing it")
    p.add_argument("--ood-data", type=Path, default=None,
                   help="images of other domains to report the flagged share of (a folder of images, or of folders: "
                        "one set each); never fitted on")
    p.add_argument("--accept-collapse", action="store_true",
                   help="archive a model whose answers collapse onto a few classes anyway (an example with random "
                        "weights): the report says so at the top; every other fault is still refused")
    p.add_argument("--limit", type=int, default=400, help="images the doctor and the spec proposal look at")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, default=REPO / "handler" / "model-config.yaml",
                   help="model-config.yaml to derive the archive's from (served in fp32: no int8 variant is made)")
    p.add_argument("--out", type=Path, default=None, help="report and model folder (default: build/NAME)")
    p.add_argument("--store", type=Path, default=REPO / "model_store", help="where NAME.mar is written")
    return p


# --- inputs -----------------------------------------------------------------------------------------------
def load_model(path: Path):
    if not path.is_file():
        raise ArchiveRefused("load", f"{path} does not exist: MODEL must be a TorchScript file (.pt)")
    extra = {SPEC_FILENAME: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as exc:
        raise ArchiveRefused("load", f"{path} is not a TorchScript file ({str(exc).splitlines()[0][:160]}): export "
                             "the model with torch.jit.script(model.eval()).save(path)") from None
    text = extra[SPEC_FILENAME]
    return model, (text.decode() if isinstance(text, bytes) else text) or None


def folder_key(name: str) -> str:
    return name.replace("/", "_").strip().lower()


def labels_for(data: folders.Folder, spec: ModelSpec) -> np.ndarray:
    """The folder's labels as the spec's class indices (folder names match class names; '/' may be '_')."""
    index = {folder_key(n): i for i, n in enumerate(spec.class_names)}
    unknown = [n for n in data.class_names if folder_key(n) not in index]
    if unknown:
        raise folders.DataError(f"the class folders {unknown[:8]} are not classes of the spec (its classes: "
                                f"{list(spec.class_names)[:8]}{' ...' if spec.num_classes > 8 else ''}); name each "
                                "folder after its class ('/' may be written '_')")
    to_spec = np.asarray([index[folder_key(n)] for n in data.class_names])
    return to_spec[data.labels]


def served_inputs(files: list[bytes], spec: ModelSpec, desc: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each file through the server's own preprocessing (``bytes_to_input``), as an upload."""
    pairs = []
    for i, data in enumerate(tqdm(files, desc=desc, leave=False, mininterval=1.0)):
        try:
            pairs.append(bytes_to_input(data, spec))
        except RequestError as exc:
            raise folders.DataError(f"image {i} of {desc} is refused by the server's preprocessing: {exc.message}") from None
    x = torch.stack([t for t, _ in pairs])
    s = torch.stack([s for _, s in pairs]) if pairs[0][1] is not None else None
    return x, s


def model_images(files: list[bytes], spec: ModelSpec) -> np.ndarray:
    """What the server's preprocessing makes of each file before normalisation: uint8 at the input size and mode."""
    return np.stack([np.asarray(canonical_image(decode_image(f), spec).image, dtype=np.uint8) for f in files])


def features_of(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, embedding) from ``forward_features``, in batches sized for the input."""
    batch = max(8, min(512, int(2**22 // max(1, x[0].numel()))))
    with torch.inference_mode():
        outs = [model.forward_features(x[i : i + batch]) for i in range(0, len(x), batch)]
    return torch.cat([o[0].float() for o in outs]), torch.cat([o[1].float() for o in outs])


def other_domains(path: Path | None, limit: int = 500) -> dict[str, list[bytes]]:
    if path is None:
        return {}
    if not path.is_dir():
        raise folders.DataError(f"--ood-data {path} is not a folder")

    def files(folder: Path) -> list[bytes]:
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in folders.IMAGE_SUFFIXES)
        return [p.read_bytes() for p in found[:limit]]

    subs = sorted(p for p in path.iterdir() if p.is_dir())
    sets = {p.name: files(p) for p in subs} if subs else {path.name: files(path)}
    return {name: f for name, f in sets.items() if f}


# --- the doctor -------------------------------------------------------------------------------------------
def refuse_failed(verdicts: list[doctor.Verdict], when: str, accepted: tuple[str, ...] = ()) -> None:
    failed = [v for v in verdicts if v.ok is False and v.check not in accepted]
    if failed:
        raise ArchiveRefused(failed[0].check, f"the doctor found {len(failed)} fault(s) {when}: "
                             + "; ".join(f"{v.check}: {v.summary}" for v in failed))


def precheck(model, data: folders.Folder) -> None:
    """Before a spec is proposed: the model must run on a batch, be deterministic and return logits."""
    sample = data.images(propose.stratified(data.labels, 16))
    grey = all(img.mode == "L" for img in sample)
    size = propose.modal_size(sample)
    shapes, k = propose.accepted_shapes(model, 1 if grey else 3, size)
    if not shapes:
        verdict = doctor.check_shape(model, propose.provisional_spec(data, 1 if grey else 3, size))
        raise ArchiveRefused("input shape", verdict.summary)
    c, h, w = shapes[0]
    spec = propose.provisional_spec(data, c, (h, w), k)
    verdicts = [doctor.check_eval_mode(model, spec)]
    noise = torch.rand(64, c, h, w, generator=torch.Generator().manual_seed(2))
    verdicts.append(doctor.check_logits(doctor.predict(model, noise)))
    refuse_failed(verdicts, "before a spec could be proposed")


def run_doctor(model, model_path: Path, spec: ModelSpec, data: folders.Folder, labels: np.ndarray, limit: int,
               out: Path) -> list:
    rows = propose.stratified(labels, limit)
    ref = (model_images([data.files[i] for i in rows], spec), labels[rows],
           f"{data.root} ({len(rows)} images, stratified)")
    verdicts, extras = doctor.diagnose(model, spec, ref)
    out.mkdir(parents=True, exist_ok=True)
    written = doctor.figures(out, model, spec, extras) if verdicts[0].ok and extras else []
    doctor.report(out, model_path, verdicts, extras, written)
    for v in verdicts:
        print(f"  {v.status}  {v.check}: {v.summary}")
    return verdicts


# --- golden inputs ----------------------------------------------------------------------------------------
def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def golden_inputs(model, spec: ModelSpec, ood_params: dict, files: list[bytes], labels: np.ndarray,
                  outliers: list[Image.Image]) -> list[dict]:
    """Three of the user's images (not flagged, far from every threshold: right ones first, different classes
    where possible; a model at chance may answer none right, and the check is about answering as at export)
    and one synthetic outlier (flagged, far above the threshold), with the answers seen."""
    policy = Policy.from_spec(spec, ood_params)
    threshold = spec.ood.threshold
    scored = []
    for i, data in enumerate(files):
        if len(data) > GOLDEN_MAX_BYTES:
            img = decode_image(data)
            img.thumbnail((1024, 1024))
            data = png_bytes(img)
        body = golden.answer_bytes(data, model, spec, policy)
        probs = sorted((t["probability"] for t in body["top_k"]), reverse=True)
        margin = min(probs[0] - probs[1], abs(body["ood_score"] - threshold))
        if not body["out_of_distribution"]:
            scored.append((body["class_index"] == int(labels[i]), margin, int(labels[i]), data, body))
    out, used = [], set()
    for _, _, label, data, body in sorted(scored, key=lambda t: (not t[0], -t[1])):
        if label not in used or len(used) >= len(set(labels.tolist())):
            out.append({"name": f"image_{len(out) + 1}_{body['label']}", "image": base64.b64encode(data).decode(),
                        "expected": golden.expected(body)})
            used.add(label)
        if len(out) == 3:
            break
    best = None
    for img in outliers:
        data = png_bytes(img)
        body = golden.answer_bytes(data, model, spec, policy)
        if body["out_of_distribution"] and (best is None or body["ood_score"] > best[1]["ood_score"]):
            best = (data, body)
    if len(out) < 3 or best is None:
        raise ArchiveRefused("golden inputs", f"found {len(out)} of your calibration images not flagged, and "
                             f"{'no' if best is None else 'one'} flagged synthetic outlier: the model or its detector "
                             "is not fit to serve (see the report)")
    out.append({"name": "outlier", "image": base64.b64encode(best[0]).decode(), "expected": golden.expected(best[1])})
    return out


# --- the archive ------------------------------------------------------------------------------------------
def archive_config(template: Path, out: Path) -> Path:
    """The template's model-config.yaml, served in fp32 (a user's model comes without an int8 variant)."""
    text = template.read_text()
    text, n = re.subn(r"(?m)^(\s*precision:\s*)int8\b.*$", r"\1fp32", text)
    doc = yaml.safe_load(text) or {}
    if (doc.get("handler") or {}).get("precision", "fp32") != "fp32":
        raise ArchiveRefused("config", f"{template}: could not set handler.precision to fp32")
    path = out / "model-config.yaml"
    path.write_text("# Derived by scripts/byo/archive.py from " + str(template.name) + ": precision fp32.\n" + text)
    return path


def verify_saved(path: Path, golden_entries: list[dict]) -> list[str]:
    """Load the saved file as a worker does (as exported and optimised) and answer the golden inputs."""
    artifact = read_model(path, sidecars=False)
    policy = Policy.from_spec(artifact.spec, artifact.ood)
    problems = golden.verify(golden_entries, artifact.model.eval(), artifact.spec, policy)
    fast = optimized(artifact.model, artifact.spec, torch.device("cpu"))
    problems += [f"optimised: {p}" for p in golden.verify(golden_entries, fast, artifact.spec, policy)]
    return problems


def chance_warning(accuracy: float, chance: float, n: int) -> str | None:
    se = math.sqrt(max(chance * (1 - chance), 1e-4) / n)
    if accuracy <= chance + 3 * se:
        return (f"The model answers the test part no better than always naming its commonest class "
                f"({accuracy:.1%} vs {chance:.1%}): its weights look random, "
                "or it was trained for another task. Its confidences are calibrated to that (all low) and its "
                "detector is fitted, but its answers mean nothing.")
    return None


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    if not NAME.match(args.name):
        raise ArchiveRefused("name", f"NAME {args.name!r} must be letters, digits, '_' or '-' (at most 64), "
                             "starting with a letter, digit or '_': it becomes the URL /predictions/NAME")
    out = args.out or REPO / "build" / args.name
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model, inside = load_model(args.model)
    data = folders.load(args.data)
    print(f"archive {args.name}: {args.model} with {len(data)} images in {len(data.class_names)} classes from {args.data}")

    proposal = None
    if args.spec is not None:
        spec, source = ModelSpec.from_json(args.spec.read_text()), f"Given: `{args.spec}`."
    elif inside:
        spec, source = ModelSpec.from_json(inside), f"The spec inside `{args.model}`."
    else:
        precheck(model, data)
        try:
            proposal = propose.propose(model, data, args.name, limit=args.limit)
        except propose.ProposalError as exc:
            raise ArchiveRefused(exc.check, str(exc)) from None
        spec = proposal.spec
        (out / "spec.proposed.json").write_text(spec.to_json() + "\n")
        source = (f"Proposed from measurements on your images (written to `{out / 'spec.proposed.json'}`: check it, "
                  "edit it if needed and pass it back with SPEC=).")
        print(f"proposed spec: {spec.channels}x{spec.input_size[0]}x{spec.input_size[1]}, {spec.resize}, mean "
              f"{list(spec.mean)} std {list(spec.std)}, background {list(spec.background)} ({proposal.polarity}), "
              f"classes {list(spec.class_names)[:10]} ({proposal.order}); written to {out / 'spec.proposed.json'}")
    spec = dataclasses.replace(spec, name=args.name)
    labels = labels_for(data, spec)

    print("doctor:")
    verdicts = run_doctor(model, args.model, spec, data, labels, args.limit, out / "doctor")
    accepted = ("collapse",) if args.accept_collapse else ()
    refuse_failed(verdicts, f"(report: {out / 'doctor' / 'report.md'})", accepted)
    overruled = [f"Archived although the doctor failed it ({v.check}, --accept-collapse): {v.summary}."
                 for v in verdicts if v.ok is False and v.check in accepted]

    parts = folders.split(labels, args.test_share, args.seed)
    cal = parts.calibration
    x, s = served_inputs(data.files, spec, "preprocessing (as served)")
    y = torch.as_tensor(labels)
    noise = torch.randn(8, spec.channels, *spec.input_size, generator=torch.Generator().manual_seed(3))
    try:
        feats = read_features(model, [x[parts.fit[:64]], noise])
    except FeaturesError as exc:
        raise ArchiveRefused("features", str(exc)) from None
    served = feats.model.eval()
    print(f"features: {feats.about}")
    logits, embedding = features_of(served, x)

    def sig(rows):  # the raw-image signals of those rows (None without canonicalisation)
        return None if s is None else s[rows]

    # Calibration part: the temperature.
    temperature = fit_temperature(logits[cal], y[cal])
    spec = dataclasses.replace(spec, temperature=round(temperature, 4))

    # The detector: Gaussians and combination on the fit half, threshold on the tune half.
    rng = np.random.default_rng(args.seed)
    fit_images = model_images([data.files[i] for i in parts.fit], spec)
    outlier_images, kinds = synth.outliers(fit_images, max(len(parts.fit), 200), rng)
    x_out, s_out = image_inputs(outlier_images, spec)
    layers, shrinkage = det.fit_layers(embedding[parts.fit], labels[parts.fit], feats.layers)
    detector = det.fit(spec.temperature, layers, (logits[parts.fit], embedding[parts.fit], sig(parts.fit)),
                       (*features_of(served, x_out), s_out))
    tune_scores = det.scores(detector, logits[parts.tune], embedding[parts.tune], sig(parts.tune))
    detector = det.with_threshold(detector, ood.threshold_at(tune_scores, args.false_alarm_rate), args.false_alarm_rate)
    ood_params = detector.to_params()
    spec = dataclasses.replace(spec, ood=detector.spec)

    # Calibration part, as served: the uncertain threshold.
    if args.threshold is not None:
        spec = dataclasses.replace(spec, threshold=args.threshold)
    else:
        answered = classify(served, x[cal], torch.ones(len(cal), dtype=torch.bool), Policy.from_spec(spec, ood_params),
                            sig(cal))
        confidence, predicted = answered.probs.max(dim=1)
        spec = dataclasses.replace(spec, threshold=choose_threshold(confidence, predicted != y[cal], answered.ood,
                                                                     args.max_confidently_wrong))
    policy = Policy.from_spec(spec, ood_params)

    # The test part: the report's figures and the drift reference.
    test = parts.test
    reference = reference_stats(served, x[test], y[test], spec, ood_params, sig(test))
    answered = classify(served, x[test], torch.ones(len(test), dtype=torch.bool), policy, sig(test))
    confidence, predicted = answered.probs.max(dim=1)
    wrong = predicted != y[test]
    before = torch.softmax(logits[test], dim=1)
    after = torch.softmax(logits[test] / spec.temperature, dim=1)
    test_images = model_images([data.files[i] for i in test], spec)
    test_outliers, _ = synth.outliers(test_images, len(test), np.random.default_rng(args.seed + 1))
    x_to, s_to = image_inputs(test_outliers, spec)
    outlier_flags = classify(served, x_to, torch.zeros(len(x_to), dtype=torch.bool), policy, s_to)
    chance = float(np.bincount(labels[test]).max() / len(test))
    figures = {
        "n": len(test), "correct": int((~wrong).sum()), "accuracy": float((~wrong).float().mean()), "chance": chance,
        "ece_before": expected_calibration_error(before, y[test]), "ece_after": expected_calibration_error(after, y[test]),
        "uncertain_rate": float((confidence < spec.threshold).float().mean()),
        "confidently_wrong": float((wrong & (confidence >= spec.threshold) & ~answered.ood).float().mean()),
        "ood_rate": float(answered.ood.float().mean()),
        "synthetic_outliers_flagged": float(outlier_flags.ood.float().mean()),
    }
    domains, domain_scores = {}, {}
    for name, files in other_domains(args.ood_data).items():
        xo, so = served_inputs(files, spec, f"other domain {name}")
        flagged = classify(served, xo, torch.zeros(len(xo), dtype=torch.bool), policy, so)
        domains[name] = {"n": len(files), "flagged": float(flagged.ood.float().mean())}
        domain_scores[name] = flagged.ood_score
    reference.update(test_figures=figures, other_domains=domains, temperature_fitted_on="calibration part",
                     n_calibration=len(cal))

    cal_outliers, _ = synth.outliers(model_images([data.files[i] for i in parts.tune[:64]], spec), 64,
                                     np.random.default_rng(args.seed + 2))
    entries = golden_inputs(served, spec, ood_params, [data.files[i] for i in cal], labels[cal], cal_outliers)

    model_path = out / f"{args.name}.pt"
    served.save(str(model_path), _extra_files={SPEC_FILENAME: spec.to_json(), REFERENCE_FILENAME: json.dumps(reference),
                                               OOD_FILENAME: json.dumps(ood_params, separators=(",", ":")),
                                               GOLDEN_FILENAME: json.dumps(entries)})
    problems = verify_saved(model_path, entries)
    if problems:
        raise ArchiveRefused("golden inputs", "the saved model answers its golden inputs differently after loading: "
                             + "; ".join(problems))

    warnings_ = overruled + [w for w in [chance_warning(figures["accuracy"], chance, len(test))] if w]
    doc = {"name": args.name, "model": str(args.model), "data": str(args.data), "images": len(data),
           "classes_in_data": list(data.class_names), "archive": str(args.store / f"{args.name}.mar"),
           "spec_source": source, "spec": json.loads(spec.to_json()), "test": figures, "other_domains": domains,
           "warnings": warnings_, "proposal": proposal.to_json() if proposal else None,
           "doctor": [dataclasses.asdict(v) | {"status": v.status} for v in verdicts],
           "detector": {"features": feats.to_json(), "fit_images": len(parts.fit), "tune_images": len(parts.tune),
                        "outliers": len(outlier_images), "outlier_kinds": sorted(set(kinds)), "shrinkage": shrinkage},
           "golden": [{"name": g["name"], "expected": g["expected"]} for g in entries],
           "split": {"seed": args.seed, "fit": len(parts.fit), "tune": len(parts.tune), "test": len(test)}}

    names = list(spec.class_names)
    report.confusion_png(out / "confusion_matrix.png", labels[test], predicted.numpy(), names, figures["accuracy"])
    report.reliability_png(out / "reliability.png", before, after, y[test], figures["ece_before"], figures["ece_after"],
                           spec.temperature)
    report.ood_png(out / "ood_scores.png", {"your test images": answered.ood_score, "synthetic outliers": outlier_flags.ood_score,
                                            **domain_scores}, spec.ood.threshold)
    (out / "spec.json").write_text(spec.to_json() + "\n")

    pargs = package.get_args_parser().parse_args([
        "--model", str(model_path), "--name", args.name, "--version", args.version,
        "--config", str(archive_config(args.config, out)), "--export-path", str(args.store)])
    target = package.main(pargs)
    doc["seconds"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "report.md").write_text(report.markdown(doc))
    print(f"test part (n={figures['n']}): accuracy {figures['accuracy']:.1%}, ECE {figures['ece_before']:.1%} -> "
          f"{figures['ece_after']:.1%} (T = {spec.temperature}), uncertain {figures['uncertain_rate']:.1%} "
          f"(< {spec.threshold}), confidently wrong {figures['confidently_wrong']:.1%}, flagged "
          f"{figures['ood_rate']:.1%}; synthetic outliers flagged {figures['synthetic_outliers_flagged']:.1%}"
          + "".join(f"; {n} flagged {d['flagged']:.1%}" for n, d in domains.items()))
    for w in warnings_:
        print(f"warning: {w}")
    print(f"report: {out / 'report.md'}\narchive: {target}\nserve it: make serve MAR={target.relative_to(REPO) if target.is_relative_to(REPO) else target}")
    return doc


def image_inputs(images: list[Image.Image], spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    pairs = [image_to_input(img, spec) for img in images]
    return torch.stack([t for t, _ in pairs]), (torch.stack([s for _, s in pairs]) if pairs[0][1] is not None else None)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except ArchiveRefused as exc:
        sys.exit(f"archive refused ({exc.check}): {exc}")
    except (folders.DataError, SpecError) as exc:
        sys.exit(f"archive refused (data): {exc}")
