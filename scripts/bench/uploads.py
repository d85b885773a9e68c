"""Uploads: what a photo costs from its bytes to the answer, in-process and through the front door.

    make bench-uploads                       # = python -m scripts.bench.uploads (also run by make bench)
    python -m scripts.bench.uploads --seconds 4 --baseline-rev ffa3025

The files (rendered by our own code into ``--workdir``, the same every run): the 28x28 example PNG,
a 300 px catalogue JPEG (``scripts.train.photos``), 1, 3 and 12 MP phone JPEGs on a plain backdrop and a
12 MP phone JPEG of a garment on a fabric, stored sideways with an EXIF orientation tag
(``scripts.train.scenes``; 0.9 MB like a denoised phone photo, and again with heavy sensor grain at 2.7 MB),
and that textured photo as a HEIC (pillow-heif's x265) and an AVIF (Pillow's).

1. **In-process**, one thread, in a fresh process per side: ``handler.preprocess.bytes_to_input`` on each
   file (median of repeated runs) against the file's decode floor: a JPEG decoded at 1/8 scale with
   libjpeg's DCT scaling (``Image.draft``), any other format decoded plainly. The same for the handler of
   ``--baseline-rev`` (``git archive``: the revision before this work), in a process of its own.
2. **Through the front door**: a serving stack as ``make serve`` starts it (gateway, hop, one TorchServe
   replica with the shipped config.properties and model-config.yaml; the current archive and the
   baseline's side by side), ``hey`` on loopback: p50/p99 at concurrency 1 and requests/s at concurrency 8
   for every file; requests/s at concurrency 16 on the textured 12 MP photos; the baseline on the two
   headline cases (12 MP plain at concurrency 1, textured at 16). The load average is recorded per point.

Results: docs/benchmarks_uploads.json and the "Uploads" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.bench.report import replace_section
from scripts.train.data import DEFAULT_DATA, REPO, load_idx_dir, split

DOCS = REPO / "docs"
BASELINE_REV = "ffa3025"  # the last commit before decoding at the needed scale (issue 21)
START, END = "<!-- uploads-bench:start -->", "<!-- uploads-bench:end -->"
HEADLINE_PLAIN, HEADLINE_TEXTURED = "12 MP JPEG, plain backdrop", "12 MP phone JPEG, fabric, EXIF-rotated"
GRAINY = "12 MP phone JPEG, fabric, EXIF-rotated, heavy sensor grain"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=6.0, help="seconds of load per point through the front door")
    p.add_argument("--inproc-seconds", type=float, default=2.0, help="least time spent on each file in-process")
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision whose handler/ and models are the baseline")
    p.add_argument("--workdir", type=Path, default=REPO / "build" / "bench_uploads")
    p.add_argument("--json", type=Path, default=DOCS / "benchmarks_uploads.json")
    p.add_argument("--markdown", type=Path, default=DOCS / "benchmarks.md")
    p.add_argument("--no-http", action="store_true", help="in-process measurements only")
    # Internal: the in-process measurement, run in a fresh process whose handler/ comes first on sys.path.
    p.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    return p


# --- the files -------------------------------------------------------------------------------------------

def make_files(workdir: Path) -> dict[str, dict]:
    """{label: {"path", "content_type", "pixels"}}, rendered once into ``workdir`` (deterministic)."""
    from scripts.train.photos import render_photo
    from scripts.train.scenes import render_scene

    folder = workdir / "files"
    folder.mkdir(parents=True, exist_ok=True)
    ds = load_idx_dir(DEFAULT_DATA)
    held = split(ds, seed=0).holdout
    boot = ds.images[held[ds.labels[held] == 9][0]]  # an ankle boot, as in the issue
    files: dict[str, dict] = {}

    def add(label: str, name: str, data: bytes, content_type: str) -> None:
        path = folder / name
        if not path.exists():
            path.write_bytes(data)
        with Image.open(path) as img:
            files[label] = {"path": str(path), "content_type": content_type, "size": list(img.size),
                            "bytes": path.stat().st_size}

    add("28x28 PNG", "native.png", (REPO / "examples" / "ankle_boot.png").read_bytes(), "image/png")
    if not (folder / "catalogue.jpg").exists():
        photo = render_photo(boot, "catalogue_white", np.random.default_rng(3))
        photo = photo.resize((300, round(300 * photo.height / photo.width)), Image.LANCZOS)
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=90)
        (folder / "catalogue.jpg").write_bytes(buffer.getvalue())
    add("300 px catalogue JPEG", "catalogue.jpg", b"", "image/jpeg")
    for label, name, size in (("1 MP JPEG", "1mp.jpg", (1152, 864)), ("3 MP JPEG", "3mp.jpg", (2000, 1500)),
                              (HEADLINE_PLAIN, "12mp_plain.jpg", (4000, 3000))):
        if not (folder / name).exists():
            (folder / name).write_bytes(render_scene(boot, "plain", np.random.default_rng(7), "eval", size=size,
                                                     orientation=1).data)
        add(label, name, b"", "image/jpeg")
    for label, name, grain, quality in ((HEADLINE_TEXTURED, "12mp_fabric_exif.jpg", 1, (75, 75)),
                                        (GRAINY, "12mp_fabric_exif_grain.jpg", 4, (90, 90))):
        if not (folder / name).exists():
            rng = np.random.default_rng(11)
            while True:  # the first flat lay drawn on a fabric
                scene = render_scene(boot, "flat_lay", rng, "eval", size=(4000, 3000), orientation=6, grain=grain,
                                     quality=quality)
                if scene.detail.startswith("fabric"):
                    break
            (folder / name).write_bytes(scene.data)
        add(label, name, b"", "image/jpeg")
    textured = folder / "12mp_fabric_exif.jpg"
    upright = None
    for label, name, fmt in (("12 MP HEIC (the fabric photo)", "12mp_fabric.heic", "HEIF"),
                             ("12 MP AVIF (the fabric photo)", "12mp_fabric.avif", "AVIF")):
        if not (folder / name).exists():
            if upright is None:
                from handler.decode import FULL, decode

                upright = decode(textured.read_bytes(), 10**8, 1, FULL)
            buffer = io.BytesIO()
            upright.save(buffer, format=fmt, quality=80)
            (folder / name).write_bytes(buffer.getvalue())
        add(label, name, b"", "image/heic" if fmt == "HEIF" else "image/avif")
    return files


# --- in-process -----------------------------------------------------------------------------------------

def floor(data: bytes) -> None:
    """The least a decoder must do for this file: 1/8 DCT scaling for a JPEG, a plain decode otherwise."""
    img = Image.open(io.BytesIO(data))
    if img.format in ("JPEG", "MPO"):
        img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
    img.load()


def timed(fn, data: bytes, least_s: float) -> float:
    """Median milliseconds of ``fn(data)`` over at least 5 runs and ``least_s`` seconds (after one warm-up)."""
    fn(data)
    times, started = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - started < least_s:
        t0 = time.perf_counter()
        fn(data)
        times.append((time.perf_counter() - t0) * 1000)
        if len(times) >= 2000:
            break
    return statistics.median(times)


def measure(files: dict[str, dict], least_s: float) -> dict:
    """In this process (whichever handler/ comes first on sys.path): preprocessing and floor per file."""
    import torch

    import handler
    from handler.errors import RequestError
    from handler.loader import read_model
    from handler.preprocess import bytes_to_input

    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # the baseline handler does not use OpenCV
        pass
    # The model beside this handler/ (the baseline's own, whose spec its handler understands).
    spec = read_model(Path(handler.__file__).resolve().parents[1] / "models" / "fashion_cnn.pt").spec
    out = {}
    for label, f in files.items():
        data = Path(f["path"]).read_bytes()
        try:
            bytes_to_input(data, spec)
        except RequestError as exc:
            out[label] = {"refused": f"{exc.status} {exc.type}"}
            continue
        out[label] = {"preprocess_ms": timed(lambda d: bytes_to_input(d, spec), data, least_s),
                      "floor_ms": timed(floor, data, least_s / 2)}
    return out


def measure_in_subprocess(files: dict, least_s: float, workdir: Path, handler_root: Path | None) -> dict:
    """``measure`` in a fresh Python process; ``handler_root``: a folder whose handler/ shadows the repository's."""
    spec_file, out_file = workdir / "files.json", workdir / f"measure-{'baseline' if handler_root else 'current'}.json"
    spec_file.write_text(json.dumps(files))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (handler_root, REPO) if p)}
    cmd = [sys.executable, "-m", "scripts.bench.uploads", "--measure", str(spec_file),
           "--inproc-seconds", str(least_s), "--json", str(out_file)]
    subprocess.run(cmd, cwd=handler_root or REPO, env=env, check=True)
    return json.loads(out_file.read_text())


def baseline_tree(rev: str, into: Path) -> Path:
    """handler/ and models/ of ``rev``, extracted into ``into``."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev, "handler", "models"], check=True,
                          capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        Path(tmp.name).write_bytes(data)
        with tarfile.open(tmp.name) as tar:
            tar.extractall(into, filter="data")
    return into


# --- through the front door ------------------------------------------------------------------------------

def http(files: dict, baseline: Path, workdir: Path, seconds: float) -> dict:
    from scripts.bench.drive import GatewayTarget, archive, derive_config, hey  # the serving stack: not in --measure
    store = workdir / "model_store"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    config = derive_config(workdir / "configs" / "shipped.yaml")
    archive("ours", "fashion_cnn", store, config, REPO / "models" / "fashion_cnn.pt")
    archive("ours", "baseline", store, config, baseline / "models" / "fashion_cnn.pt", handler_dir=baseline / "handler")
    stack = GatewayTarget(workdir / "stack", 1, "fashion_cnn", store, "fashion_cnn.mar,baseline.mar").start()
    rows: dict[str, dict] = {}
    try:
        def point(model: str, label: str, concurrency: int, secs: float) -> dict:
            f = files[label]
            load = round(os.getloadavg()[0], 2)
            r = hey(stack, model, Path(f["path"]), f["content_type"], {}, concurrency, secs)
            return {"requests_per_s": r["ok_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                    "responses": r["responses"], "non_200": r["error_count"], "load1": load}

        for label in files:
            hey(stack, "fashion_cnn", Path(files[label]["path"]), files[label]["content_type"], {}, 2, 1.0)  # warm-up
            rows[label] = {"c1": point("fashion_cnn", label, 1, seconds), "c8": point("fashion_cnn", label, 8, seconds)}
        for label in (HEADLINE_TEXTURED, GRAINY):
            rows[label]["c16"] = point("fashion_cnn", label, 16, seconds)
        baseline_rows = {HEADLINE_PLAIN: {"c1": point("baseline", HEADLINE_PLAIN, 1, max(seconds, 8))},
                         HEADLINE_TEXTURED: {"c16": point("baseline", HEADLINE_TEXTURED, 16, max(seconds, 10))}}
    finally:
        stack.stop()
    return {"current": rows, "baseline": baseline_rows}


# --- report ---------------------------------------------------------------------------------------------

def files_mb(result: dict, label: str) -> str:
    return f"{result['files'][label]['bytes'] / 1e6:.1f} MB"


def verdicts(result: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for issue 21's upload targets."""
    cur, out = result["inproc"]["current"], []
    jpegs = [k for k in cur if "JPEG" in k and "MP" in k]
    ratios = {k: cur[k]["preprocess_ms"] / cur[k]["floor_ms"] for k in jpegs}
    worst = max(ratios, key=ratios.get)
    out.append(("in-process preprocessing <= 3x the draft-decode floor, every JPEG of 1 MP or more",
                "; ".join(f"{k}: {v:.1f}x" for k, v in ratios.items()),
                "met" if ratios[worst] <= 3 else f"missed ({worst}: {ratios[worst]:.1f}x)"))
    cat = cur["300 px catalogue JPEG"]["preprocess_ms"]
    out.append(("300 px catalogue JPEG preprocessed within 2 ms", f"{cat:.2f} ms",
                "met" if cat <= 2 else f"missed by {cat - 2:.2f} ms"))
    http_rows = result.get("http", {}).get("current")
    if http_rows:
        p50 = {k: http_rows[k]["c1"]["p50_ms"] for k in (HEADLINE_PLAIN, HEADLINE_TEXTURED)}
        out.append(("a 12 MP phone JPEG through the front door at concurrency 1: p50 <= 60 ms",
                    "; ".join(f"{k}: {v:.1f} ms" for k, v in p50.items()),
                    "met" if max(p50.values()) <= 60 else f"missed (worst {max(p50.values()):.1f} ms)"))
        rps = http_rows[HEADLINE_TEXTURED]["c16"]["requests_per_s"]
        grainy = http_rows.get(GRAINY, {}).get("c16", {}).get("requests_per_s")
        out.append(("the textured 12 MP photo at concurrency 16: >= 40 requests/s",
                    f"{rps:.1f} requests/s" + (f" ({grainy:.1f} with heavy sensor grain, {files_mb(result, GRAINY)})"
                                               if grainy is not None else ""),
                    "met" if rps >= 40 else f"missed ({rps / 40:.0%} of target)"))
    return out


def markdown(result: dict) -> str:
    cur, base = result["inproc"]["current"], result["inproc"]["baseline"]
    files = result["files"]
    http_rows = result.get("http", {})
    lines = [START, "## Uploads", "",
             f"`{result['command']}` ({result['date']}; {result['machine']['nproc']} cores, "
             f"{result['machine']['cpu_model']}; load average {result['load_avg_start'][0]:.2f} at the start). "
             f"Baseline: handler/ and models of `{result['baseline_rev']}`, the commit before decoding at the needed "
             "scale. Raw figures: [benchmarks_uploads.json](benchmarks_uploads.json).", "",
             "In-process, one thread: `bytes_to_input` (decode, canonicalise, tensor) against the file's decode floor "
             "(a JPEG decoded at 1/8 with libjpeg's DCT scaling, any other format decoded plainly).", "",
             "| upload | size | file | baseline ms | now ms | floor ms | now / floor |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for label, f in files.items():
        c, b = cur.get(label, {}), base.get(label, {})
        before = b.get("refused") or (f"{b['preprocess_ms']:.2f}" if b else "-")
        now = c.get("refused") or f"{c['preprocess_ms']:.2f}"
        fl = f"{c['floor_ms']:.2f}" if "floor_ms" in c else "-"
        ratio = f"{c['preprocess_ms'] / c['floor_ms']:.1f}x" if "floor_ms" in c else "-"
        lines.append(f"| {label} | {f['size'][0]}x{f['size'][1]} | {f['bytes'] / 1024:,.0f} KiB | {before} | {now} | "
                     f"{fl} | {ratio} |")
    if http_rows:
        lines += ["", "Through the front door (gateway, hop, one TorchServe replica; shipped config, TTA as served), "
                  f"`hey` for {result['seconds']:g} s per point:", "",
                  "| upload | c=1 p50 ms | c=1 p99 ms | c=8 requests/s | c=16 requests/s | failed | load1 |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for label, r in http_rows["current"].items():
            c16 = f"{r['c16']['requests_per_s']:.1f}" if "c16" in r else ""
            failed = sum(p["non_200"] for p in r.values())
            loads = ", ".join(str(p["load1"]) for p in r.values())
            lines.append(f"| {label} | {r['c1']['p50_ms']:.1f} | {r['c1']['p99_ms']:.1f} | {r['c8']['requests_per_s']:.1f} | "
                         f"{c16} | {failed} | {loads} |")
        b = http_rows["baseline"]
        lines += ["", f"The baseline in the same stack: {HEADLINE_PLAIN} at concurrency 1, p50 "
                  f"{b[HEADLINE_PLAIN]['c1']['p50_ms']:.0f} ms; {HEADLINE_TEXTURED} at concurrency 16, "
                  f"{b[HEADLINE_TEXTURED]['c16']['requests_per_s']:.1f} requests/s (p50 "
                  f"{b[HEADLINE_TEXTURED]['c16']['p50_ms']:.0f} ms)."]
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in verdicts(result)]
    lines.append(END)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    # --measure runs under the baseline's handler/ (PYTHONPATH): nothing that imports today's handler beyond
    # handler.preprocess may be loaded there, so the serving stack's modules are imported only below it.
    if args.measure is not None:  # the in-process half, in its own process
        result = measure(json.loads(args.measure.read_text()), args.inproc_seconds)
        args.json.write_text(json.dumps(result))
        return result
    from scripts.bench.drive import ensure_hey, machine

    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    files = make_files(args.workdir)
    baseline = baseline_tree(args.baseline_rev, args.workdir / "baseline")
    result = {"command": "python -m scripts.bench.uploads" + (" --no-http" if args.no_http else ""),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "baseline_rev": args.baseline_rev, "seconds": args.seconds,
              "load_avg_start": [round(v, 2) for v in os.getloadavg()], "files": files}
    print("in-process: current handler ...", flush=True)
    current = measure_in_subprocess(files, args.inproc_seconds, args.workdir, None)
    print("in-process: baseline handler ...", flush=True)
    result["inproc"] = {"current": current,
                        "baseline": measure_in_subprocess(files, args.inproc_seconds, args.workdir, baseline)}
    if not args.no_http:
        ensure_hey()
        print("through the front door ...", flush=True)
        result["http"] = http(files, baseline, args.workdir, args.seconds)
    result["total_seconds"] = round(time.time() - started, 1)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    section = markdown(result)
    replace_section(args.markdown, section)
    print(section)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
