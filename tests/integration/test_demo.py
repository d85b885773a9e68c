"""The browser demo (``make demo``) in a real headless Chromium against the real stack.

The session ``gateway`` (nginx + TorchServe, as ``make serve`` starts them) answers; the demo runs as
its own process (``python -m scripts.demo``) on a free loopback port with a copy of the gateway's key
file; Selenium drives Debian's chromium through chromedriver. Checked: the page loads and the key
never reaches the browser; an uploaded example gets the label the API gives for the same file, with
the bars, the canonical input and the Grad-CAM overlay; a non-garment picked from the examples gets
the out-of-distribution badge; a refused key is said plainly and a rewritten key file is picked up;
several images at once fill the gallery; the Review tab shows what to label next and a click records the label.
Screenshots: build/demo/ (docs/demo.png, docs/demo_gallery.png and docs/demo_review.png with UPDATE_SCREENSHOTS=1).

Skipped, with the reason, when chromium, chromedriver, selenium or gradio is missing (`make install`
installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from scripts.deploy.harness import REPO, free_ports

DOCS = REPO / "docs"
# Screenshots go to build/demo/ on every run; UPDATE_SCREENSHOTS=1 writes the ones docs/ and the README show.
SHOTS = DOCS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else REPO / "build" / "demo"
EXAMPLES = REPO / "examples"
STARTUP_S = 60
ANSWER_S = 30


def _missing() -> str | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    missing = [name for name, found in (("chromium", browser), ("chromedriver (chromium-driver)", driver)) if not found]
    for module in ("selenium", "gradio"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"python package {module}")
    if missing:
        return (f"browser test needs {', '.join(missing)}: `make install` installs them "
                f"(apt-get install chromium chromium-driver; the demo extra of pyproject.toml)")
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="module")
def demo(gateway, tmp_path_factory):
    """``python -m scripts.demo`` against the gateway, on a free loopback port; stopped in every case."""
    root = tmp_path_factory.mktemp("demo")
    key_file = root / "key_file.json"
    shutil.copy(gateway.key_file, key_file)
    port = free_ports(1)[0]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(root / "gradio")}
    log = (root / "demo.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.demo", "--port", str(port), "--url", gateway.inference,
                             "--key-file", str(key_file)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"the demo exited ({proc.returncode}):\n{(root / 'demo.log').read_text()[-3000:]}"
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"the demo did not answer in {STARTUP_S} s:\n{(root / 'demo.log').read_text()[-3000:]}"
            time.sleep(0.3)
        yield {"url": url, "pid": proc.pid, "key_file": key_file, "log": root / "demo.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.binary_location = next(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n))
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def wait_for(driver, css: str, timeout: float = ANSWER_S, text: str | None = None):
    """The first element matching ``css`` (whose text contains ``text``, if given), or a failure naming what was on the page."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for element in driver.find_elements(By.CSS_SELECTOR, css):
                if text is None or text in element.text:
                    return element
        except StaleElementReferenceException:
            pass
        time.sleep(0.2)
    body = driver.find_element(By.TAG_NAME, "body").text
    pytest.fail(f"{css!r}{f' with {text!r}' if text else ''} did not appear in {timeout} s; the page says:\n{body[:2000]}")


def api_answer(gateway, path: Path, explain: bool = False) -> dict:
    resp = gateway.client().predict("fashion_cnn", path.read_bytes(), headers={"X-TTA": "on"}, explain=explain)
    return resp.json()


def open_page(browser, demo):
    browser.get(demo["url"])
    wait_for(browser, "#demo-input input[type=file]")
    wait_for(browser, "#demo-server-status", text="Server ready")


def test_the_page_loads_on_loopback_only_and_the_key_stays_on_the_server(browser, demo, gateway):
    open_page(browser, demo)
    key = gateway.key("inference")
    assert key not in browser.page_source
    # Gradio serves only files it created or was allowed to: never the key file, even by its path.
    resp = requests.get(f"{demo['url']}/gradio_api/file={demo['key_file']}", timeout=10)
    assert resp.status_code != 200 and key not in resp.text
    config = requests.get(f"{demo['url']}/config", timeout=10)
    assert config.status_code == 200 and key not in config.text
    listening = {c.laddr.ip for c in psutil.Process(demo["pid"]).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}, listening


def test_an_uploaded_example_gets_the_apis_label_bars_and_explanation(browser, demo, gateway):
    from selenium.webdriver.common.by import By

    image = EXAMPLES / "coat.png"
    expected = api_answer(gateway, image)
    open_page(browser, demo)
    browser.find_element(By.CSS_SELECTOR, "#demo-input input[type=file]").send_keys(str(image))
    verdict = wait_for(browser, "#demo-verdict")
    assert verdict.get_attribute("data-label") == expected["label"]
    heading = wait_for(browser, "#demo-label [data-testid=label-output-value]", text=expected["label"])
    assert heading.text.strip() == expected["label"]
    bars = browser.find_elements(By.CSS_SELECTOR, "#demo-label meter")
    assert len(bars) == 5, "five classes drawn as bars"
    assert abs(float(bars[0].get_attribute("value")) - expected["confidence"]) < 1e-3
    badge = "demo-badge-ood" if expected["out_of_distribution"] else "demo-badge-uncertain" if expected["uncertain"] else "demo-badge-confident"
    wait_for(browser, f"#demo-verdict .{badge}")
    # The region the garment was found in, the canonical input and the Grad-CAM overlay, from /explanations.
    for box in ("#demo-region", "#demo-canonical", "#demo-overlay"):
        src = wait_for(browser, f"{box} img").get_attribute("src")
        assert requests.get(src, timeout=10).content[:8] == b"\x89PNG\r\n\x1a\n"
    wait_for(browser, "#demo-details", text="grad-cam")
    time.sleep(0.5)  # let the images paint before the picture
    SHOTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SHOTS / "demo.png"))


def test_a_non_garment_from_the_examples_gets_the_out_of_distribution_badge(browser, demo, gateway):
    from selenium.webdriver.common.by import By

    from scripts.demo.app import NON_GARMENTS

    skimage = pytest.importorskip("skimage", reason="the non-garment examples are scikit-image's photos (dev extra)")
    photo = Path(skimage.data_dir) / NON_GARMENTS[0]
    expected = api_answer(gateway, photo)
    assert expected["out_of_distribution"], f"{photo.name} is expected to be flagged: {expected}"
    open_page(browser, demo)
    wait_for(browser, "#demo-examples button.gallery-item")
    examples = browser.find_elements(By.CSS_SELECTOR, "#demo-examples button.gallery-item")
    garments = len(list(EXAMPLES.glob("*.png")))
    assert len(examples) == garments + len(NON_GARMENTS)
    examples[garments].click()  # the first non-garment, right after the garments
    badge = wait_for(browser, "#demo-verdict .demo-badge-ood")
    assert badge.text == "Out of distribution"
    sentence = browser.find_element(By.CSS_SELECTOR, "#demo-verdict").text
    assert "does not look like anything the model was trained on" in sentence
    assert browser.find_element(By.CSS_SELECTOR, "#demo-verdict").get_attribute("data-label") == expected["label"]


def test_a_refused_key_is_said_plainly_and_a_rewritten_key_file_is_used(browser, demo, gateway):
    from selenium.webdriver.common.by import By

    open_page(browser, demo)
    good = demo["key_file"].read_text()
    demo["key_file"].write_text(good.replace(gateway.key("inference"), "A" * 43))
    try:
        browser.find_element(By.CSS_SELECTOR, "#demo-input input[type=file]").send_keys(str(EXAMPLES / "sneaker.png"))
        error = wait_for(browser, "#demo-error")
        assert "refused the inference key" in error.text and str(demo["key_file"]) in error.text
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    finally:
        demo["key_file"].write_text(good)
    browser.find_element(By.ID, "demo-classify").click()  # the next request reads the file again
    assert wait_for(browser, "#demo-verdict").get_attribute("data-label") == api_answer(gateway, EXAMPLES / "sneaker.png")["label"]


def test_several_images_at_once_fill_the_gallery(browser, demo, gateway):
    from selenium.webdriver.common.by import By

    from scripts.demo.app import NON_GARMENTS

    skimage = pytest.importorskip("skimage", reason="the non-garment is one of scikit-image's photos (dev extra)")
    paths = [EXAMPLES / f"{n}.png" for n in ("ankle_boot", "bag", "dress", "pullover", "sandal", "trouser", "tshirt")]
    paths.insert(2, Path(skimage.data_dir) / NON_GARMENTS[1])
    expected = [api_answer(gateway, p) for p in paths]
    open_page(browser, demo)
    next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "Several" in t.text).click()
    wait_for(browser, "#demo-files input[type=file]").send_keys("\n".join(map(str, paths)))
    summary = wait_for(browser, "#demo-gallery-summary")
    flagged = sum(a["out_of_distribution"] for a in expected)
    assert summary.text.startswith(f"{len(paths)} images: {len(paths)} answered, {flagged} out of distribution")
    captions = wait_for(browser, "#demo-gallery", text=" · OOD").text
    for answer in expected:
        assert answer["label"] in captions
    browser.execute_script("document.querySelector('#demo-gallery-summary').scrollIntoView()")
    time.sleep(0.5)
    SHOTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SHOTS / "demo_gallery.png"))


def test_the_review_tab_shows_what_to_check_next_and_one_click_records_the_label(browser, demo, gateway):
    """A non-garment just answered (out of distribution: first in the queue) is shown with the image the model saw
    and its answer; clicking "Bag" posts that label with the feedback key, which stays on the demo's server."""
    import json
    import uuid

    from selenium.webdriver.common.by import By

    from scripts.demo.app import NON_GARMENTS

    skimage = pytest.importorskip("skimage", reason="the non-garment is one of scikit-image's photos (dev extra)")
    rid = f"review-{uuid.uuid4().hex[:12]}"
    photo = (Path(skimage.data_dir) / NON_GARMENTS[0]).read_bytes()
    answer = gateway.client().predict("fashion_cnn", photo, headers={"X-Request-ID": rid}).json()
    assert answer["out_of_distribution"], answer
    open_page(browser, demo)
    next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text.strip() == "Review").click()
    item = wait_for(browser, f'#demo-review-item[data-request-id="{rid}"]')
    assert item.get_attribute("data-label") == answer["label"] and "out of distribution" in item.text
    src = wait_for(browser, "#demo-review-image img").get_attribute("src")
    assert requests.get(src, timeout=10).content[:8] == b"\x89PNG\r\n\x1a\n"
    assert gateway.key("feedback") not in browser.page_source
    time.sleep(0.5)  # let the image paint before the picture
    SHOTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SHOTS / "demo_review.png"))
    bag = browser.find_element(By.ID, "demo-review-class-8")
    assert bag.text == "Bag"
    bag.click()
    result = wait_for(browser, "#demo-review-result", text=f'Recorded "Bag" for {rid}')
    assert f"the model said {answer['label']}" in result.text
    # the label is in the store: the same label again changes nothing, another one is refused
    post = lambda label: requests.post(  # noqa: E731
        f"{gateway.inference}/feedback/fashion_cnn", data=json.dumps({"request_id": rid, "label": label}), timeout=30,
        headers={"Authorization": f"Bearer {gateway.key('feedback')}"})
    assert post("bag").json()["status"] == "unchanged"
    assert post("not a garment").status_code == 409
    # and the next answer to check is shown (or the queue says it is empty)
    deadline = time.monotonic() + ANSWER_S
    while time.monotonic() < deadline:
        shown = browser.find_elements(By.CSS_SELECTOR, "#demo-review-item, #demo-review-empty")
        if shown and shown[0].get_attribute("data-request-id") != rid:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the next answer did not replace the labelled one")
