"""The browser demo: a Gradio page in front of the running model (``make demo``).

    make serve && make demo                  # http://127.0.0.1:7860
    python -m scripts.demo --port 7861 --url http://127.0.0.1:8080 --key-file key_file.json

One image (upload, drag and drop, paste, or an example): the label, the top classes as bars, the
uncertain and out-of-distribution badges with a sentence each, the region the garment was found in, the
canonical image the model saw and the Grad-CAM overlay (one ``/explanations`` call), and a switch for
test-time augmentation (``X-TTA``).
Several images: a gallery with one caption each and a table, the requests sent in parallel.
Review: the answers to check next (out-of-distribution and uncertain ones first, and a random share of confident
ones), each with the image the model saw and its answer; one click per class, or "not a garment", posts the label
to the feedback API (with the feedback key, read on the server like the inference key).

Every call goes through the gateway's public inference API, as any client's would, with the inference
key read from the key file by this process; the key never reaches the browser. The page binds
127.0.0.1 only, makes no share link and sends no analytics.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import tempfile
from pathlib import Path

from scripts.demo.backend import (
    DEFAULT_URL,
    MODEL,
    DemoBackend,
    Outcome,
    badges_html,
    caption,
    decode_png,
    details_markdown,
    error_html,
    label_value,
    region_image,
)
from scripts.demo.review import Item, ReviewBackend, choices, item_html, item_images
from scripts.ops.tsclient import REPO

HOST = "127.0.0.1"
DEFAULT_PORT = 7860
EXAMPLES = REPO / "examples"
# scikit-image ships these photographs in its wheel (no download); shown as examples of non-garments.
NON_GARMENTS = ("coffee.png", "chelsea.png")

CSS = """
.demo-badge-row { margin: 0.35em 0; line-height: 1.5; }
.demo-badge { display: inline-block; padding: 0.1em 0.6em; border-radius: 1em; font-weight: 600; color: #fff; }
.demo-badge-ood { background: #b91c1c; }
.demo-badge-uncertain { background: #b45309; }
.demo-badge-confident { background: #15803d; }
.demo-error { padding: 0.6em 0.8em; border-radius: 0.4em; background: #fee2e2; color: #7f1d1d; font-weight: 500; }
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("DEMO_INFERENCE_URL", DEFAULT_URL),
                   help=f"the gateway's public inference address (default: {DEFAULT_URL})")
    p.add_argument("--key-file", type=Path, default=REPO / "key_file.json",
                   help="the key file `make serve` wrote (default: the repository's key_file.json)")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", DEFAULT_PORT)),
                   help=f"port on {HOST} (default: {DEFAULT_PORT})")
    p.add_argument("--top-k", type=int, default=5, help="classes drawn as bars (1..10)")
    p.add_argument("--parallel", type=int, default=8, help="requests in flight at once in the gallery")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for one answer")
    return p


def example_files(workdir: Path) -> list[str]:
    """The garments in examples/ plus a few non-garments copied from scikit-image's shipped photos (if installed)."""
    files = [str(p) for p in sorted(EXAMPLES.glob("*.png"))]
    try:
        from skimage import data_dir
    except ImportError:
        return files
    for name in NON_GARMENTS:
        source = Path(data_dir) / name
        if source.is_file():
            target = workdir / f"not_a_garment_{name}"
            target.write_bytes(source.read_bytes())
            files.append(str(target))
    return files


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    return Path(path).read_bytes()


def review_classes(backend: DemoBackend) -> list[str]:
    """The model's classes for the Review tab's buttons (its description), the Fashion-MNIST ones if it is down."""
    description = backend.description()
    if description and description.get("classes"):
        return list(description["classes"])
    from handler.spec import FASHION_MNIST_CLASSES

    return list(FASHION_MNIST_CLASSES)


def build(backend: DemoBackend, examples: list[str], top_k: int = 5, parallel: int = 8,
          review: ReviewBackend | None = None):
    """The page, as a gr.Blocks (not launched)."""
    import gradio as gr

    review = review or ReviewBackend(backend.url, backend.key_file, backend.model, backend.timeout)

    def single(path: str | None, tta: bool):
        empty = ("", None, None, None, None, "", None)
        if not path:
            return empty
        data = _read(path)
        outcome = backend.classify(data, tta=tta, explain=True, top_k=top_k)
        if not outcome.ok:
            return (error_html(outcome.error), *empty[1:])
        answer = outcome.answer
        explanation = answer.get("explanation") or {}
        raw = {k: v for k, v in answer.items() if k != "explanation"}
        raw["explanation"] = {k: v for k, v in explanation.items() if not k.endswith("_png")}
        return (badges_html(answer, backend.confidence_threshold()), label_value(answer),
                region_image(data, explanation.get("region")),
                decode_png(explanation.get("input_png")), decode_png(explanation.get("overlay_png")),
                details_markdown(answer, outcome.notes), raw)

    def several(files: list[str] | None, tta: bool):
        paths = [str(f) for f in files or []]
        if not paths:
            return "", [], []
        datas, outcomes = [], [None] * len(paths)
        for i, path in enumerate(paths):
            try:
                datas.append((i, Path(path).read_bytes()))
            except OSError as exc:
                outcomes[i] = Outcome(error=f"cannot read the upload: {type(exc).__name__}")
        for (i, _), outcome in zip(datas, backend.classify_many([d for _, d in datas], tta=tta, parallel=parallel)):
            outcomes[i] = outcome
        names = [Path(p).name for p in paths]
        gallery = [(p, caption(o)) for p, o in zip(paths, outcomes)]
        rows = [[n, o.answer["label"], round(float(o.answer["confidence"]), 4), o.answer["uncertain"],
                 o.answer["out_of_distribution"], ""] if o.ok else [n, "", None, None, None, o.error]
                for n, o in zip(names, outcomes)]
        ok = [o for o in outcomes if o.ok]
        summary = (f"{len(paths)} images: {len(ok)} answered, "
                   f"{sum(bool(o.answer['out_of_distribution']) for o in ok)} out of distribution, "
                   f"{sum(bool(o.answer['uncertain']) for o in ok)} uncertain, {len(paths) - len(ok)} errors.")
        errors = sorted({o.error for o in outcomes if not o.ok})
        if errors and not ok:  # the server is down or refuses the key: say it once, plainly
            return error_html(errors[0]), gallery, rows
        return f'<div id="demo-gallery-summary">{summary}</div>', gallery, rows

    with gr.Blocks(title="Fashion-MNIST classifier", analytics_enabled=False) as page:
        gr.Markdown(
            "# Fashion-MNIST classifier\n"
            f"Garment photos classified by the served model through its inference API at `{backend.url}` "
            "(the key stays on the demo's server). Ten classes: T-shirt/top, Trouser, Pullover, Dress, Coat, "
            "Sandal, Shirt, Sneaker, Bag, Ankle boot.")
        status = gr.Markdown(elem_id="demo-server-status")
        with gr.Tabs():
            with gr.Tab("One image", id="single"):
                with gr.Row():
                    with gr.Column(scale=1):
                        image = gr.Image(type="filepath", image_mode=None, format="png", sources=["upload", "clipboard"],
                                         label="Image: drop, upload or paste", elem_id="demo-input", height=280)
                        tta = gr.Checkbox(value=True, label="Test-time augmentation: when the model is unsure of an "
                                          "image (its two best classes are close), it also looks at it zoomed in a "
                                          "little and averages the two answers", elem_id="demo-tta")
                        button = gr.Button("Classify", variant="primary", elem_id="demo-classify")
                        gr.Examples(examples=[[e] for e in examples], inputs=[image], label="Examples (the last ones are not garments)",
                                    examples_per_page=12, elem_id="demo-examples")
                    with gr.Column(scale=2):
                        verdict = gr.HTML(elem_id="demo-verdict-box")
                        bars = gr.Label(num_top_classes=top_k, label="Top classes", elem_id="demo-label")
                        with gr.Row():
                            found = gr.Image(label="Where the garment was found", elem_id="demo-region",
                                             format="png", interactive=False, height=240, buttons=["fullscreen"])
                            seen = gr.Image(label="What the model saw", elem_id="demo-canonical",
                                            format="png", interactive=False, height=240, buttons=["fullscreen"])
                            overlay = gr.Image(label="Grad-CAM overlay", elem_id="demo-overlay",
                                               format="png", interactive=False, height=240, buttons=["fullscreen"])
                        details = gr.Markdown(elem_id="demo-details")
                        with gr.Accordion("The API's answer (JSON)", open=False):
                            raw = gr.JSON(elem_id="demo-json")
                outputs = [verdict, bars, found, seen, overlay, details, raw]
                image.change(single, [image, tta], outputs)
                tta.change(single, [image, tta], outputs)
                button.click(single, [image, tta], outputs)
            with gr.Tab("Several images", id="gallery"):
                files = gr.File(file_count="multiple", file_types=["image"], label="Images (drop several)",
                                elem_id="demo-files", height=160)
                tta_many = gr.Checkbox(value=True, label="Test-time augmentation", elem_id="demo-tta-many")
                run_many = gr.Button("Classify all", variant="primary", elem_id="demo-classify-all")
                summary = gr.HTML(elem_id="demo-gallery-summary-box")
                gallery = gr.Gallery(label="Answers: label, confidence (OOD = not like any garment the model knows)", columns=5, height=520, elem_id="demo-gallery",
                                     object_fit="contain")
                table = gr.Dataframe(headers=["file", "label", "confidence", "uncertain", "out of distribution", "error"],
                                     elem_id="demo-table", interactive=False, wrap=True)
                run_many.click(several, [files, tta_many], [summary, gallery, table])
                files.upload(several, [files, tta_many], [summary, gallery, table])
            with gr.Tab("Review", id="review") as review_tab:
                gr.Markdown("Check the model's answers: out-of-distribution and uncertain ones first, and now and then a "
                            "confident one drawn at random (so the accuracy of confident answers is measured without "
                            "bias). Click what the image shows; the label goes to the feedback API and the next answer "
                            "appears. Labelled accuracy: `ctl feedback`.")
                skip_state, item_state = gr.State([]), gr.State(None)
                with gr.Row():
                    with gr.Column(scale=1):
                        review_seen = gr.Image(label="What the model saw", elem_id="demo-review-image", format="png",
                                               interactive=False, height=240)
                        review_upload = gr.Image(label="The upload (when the service keeps them)", format="png",
                                                 elem_id="demo-review-upload", interactive=False, height=200)
                    with gr.Column(scale=2):
                        review_info = gr.HTML(elem_id="demo-review-box")
                        review_result = gr.HTML(elem_id="demo-review-result-box")
                        class_buttons = []
                        with gr.Row():
                            for i, name in enumerate(review_classes(backend)):
                                class_buttons.append((name, gr.Button(name, elem_id=f"demo-review-class-{i}", size="sm")))
                        with gr.Row():
                            not_garment = gr.Button(choices([])[0], elem_id="demo-review-not-garment", variant="stop")
                            skip_button = gr.Button("Skip", elem_id="demo-review-skip")

                review_out = [review_info, review_seen, review_upload, item_state, skip_state, review_result]

                def review_outputs(item: Item, skip: list[str], message: str = ""):
                    canonical, upload = item_images(item)
                    shown = f'<div id="demo-review-result">{html.escape(message)}</div>' if message else ""
                    return item_html(item), canonical, upload, item.answer, skip, shown

                def review_load(skip):
                    skip = list(skip or [])
                    return review_outputs(review.next_item(skip), skip)

                def labeller(label: str):
                    def post(current, skip):
                        skip = list(skip or [])
                        if not current:
                            return review_load(skip)
                        ok, message = review.label(current, label)
                        if not ok:  # not recorded: the same answer stays, with the reason
                            return review_outputs(Item(answer=current), skip, message)
                        return review_outputs(review.next_item(skip), skip, message)
                    return post

                def review_skip(current, skip):
                    skip = list(skip or []) + ([f"{current['request_id']}:{current['index']}"] if current else [])
                    return review_outputs(review.next_item(skip), skip)

                for name, button in [*class_buttons, (not_garment.value, not_garment)]:
                    button.click(labeller(name), [item_state, skip_state], review_out)
                skip_button.click(review_skip, [item_state, skip_state], review_out)
                review_tab.select(review_load, [skip_state], review_out)
        page.load(backend.readiness, None, status)
    return page


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry
    try:
        import gradio as gr
    except ImportError:
        print("gradio is not installed: run `make install` (it installs the demo extra of pyproject.toml)",
              file=sys.stderr)
        return 2
    backend = DemoBackend(args.url, args.key_file, args.model, timeout=args.timeout)
    print(f"demo: {backend.readiness()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fashion-demo-") as workdir:
        page = build(backend, example_files(Path(workdir)), top_k=args.top_k, parallel=args.parallel)
        page.queue(default_concurrency_limit=4)
        print(f"demo: open http://{HOST}:{args.port} (Ctrl+C stops it)", flush=True)
        try:
            page.launch(server_name=HOST, server_port=args.port, share=False, inbrowser=False, ssr_mode=False,
                        mcp_server=False, show_error=False, quiet=True, css=CSS, footer_links=["gradio"],
                        theme=gr.themes.Soft(), blocked_paths=[str(args.key_file.resolve())])
        except KeyboardInterrupt:
            pass
        except OSError as exc:  # the port is taken
            print(f"demo: cannot listen on {HOST}:{args.port}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
