"""The serving image, run with podman: real answers through its gateway (opt-in).

Skipped unless podman is installed and RUN_IMAGE_TESTS=1: building the image takes minutes,
so CI does not build it by default. The image is built with ``make image``'s script when it
is missing (RUN_IMAGE_REBUILD=1 rebuilds it first), then one container is started with the
gateway's three ports published on free loopback ports, and removed at the end in every case.

    RUN_IMAGE_TESTS=1 .venv/bin/python -m pytest tests/integration/test_image.py -v
"""

from __future__ import annotations

import json
import os
import re

import pytest
import requests

from handler.spec import FASHION_MNIST_CLASSES
from scripts.deploy import image
from scripts.deploy.image import REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not image.available(), reason="podman is not installed (make image installs it)"),
    pytest.mark.skipif(os.environ.get("RUN_IMAGE_TESTS") != "1",
                       reason="opt-in: set RUN_IMAGE_TESTS=1 (builds the image with podman when missing: minutes)"),
]

EXAMPLES = sorted((REPO / "examples").glob("*.png"))


def expected_label(stem: str) -> str:
    """examples/<name>.png -> its class: ankle_boot -> 'Ankle boot', tshirt -> 'T-shirt/top'."""
    letters = re.sub("[^a-z]", "", stem.lower())
    [label] = [c for c in FASHION_MNIST_CLASSES if re.sub("[^a-z]", "", c.lower()).startswith(letters)]
    return label


@pytest.fixture(scope="module")
def container():
    if os.environ.get("RUN_IMAGE_REBUILD") == "1" or not image.image_exists():
        image.build()
    started = image.run()
    try:
        seconds = started.wait_first_200()
        print(f"\n{started.name}: first 200 through the gateway {seconds:.1f} s after podman run")
        yield started
    finally:
        started.remove()
        assert image.podman("container", "exists", started.name, check=False).returncode == 1, "container left behind"


@pytest.fixture(scope="module")
def key(container):
    return container.key("inference")


def test_every_example_gets_its_label_through_the_gateway(container, key):
    assert len(EXAMPLES) >= 10
    for path in EXAMPLES:
        resp = container.predict(path.read_bytes(), key)  # raw body, no Content-Type: the gateway normalises it
        assert resp.status_code == 200, (path.name, resp.status_code, resp.text)
        answer = resp.json()
        assert answer["label"] == expected_label(path.stem), (path.name, answer)
        assert answer["tta_views"] in (1, 3) and answer["confidence"] > 0.5  # 3 when the TTA gate opens


def test_multipart_and_json_spellings(container, key):
    coat = (REPO / "examples" / "coat.png").read_bytes()
    multipart = requests.post(f"{container.inference}/predictions/fashion_cnn", files={"data": coat},
                              headers={"Authorization": f"Bearer {key}", "X-Top-K": "5"}, timeout=30)
    assert multipart.status_code == 200 and multipart.json()["label"] == "Coat"
    assert len(multipart.json()["top_k"]) == 5


def test_credentials_are_checked_at_the_gateway(container, key):
    body = EXAMPLES[0].read_bytes()
    none = requests.post(f"{container.inference}/predictions/fashion_cnn", data=body, timeout=30)
    wrong = container.predict(body, "not-the-key")
    assert none.status_code == 401 and wrong.status_code in (401, 403)
    assert none.headers["Content-Type"].startswith("application/json") and none.json()
    inference_on_management = requests.get(f"{container.management}/models",
                                           headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert inference_on_management.status_code in (401, 403)
    management = requests.get(f"{container.management}/models/fashion_cnn",
                              headers={"Authorization": f"Bearer {container.key('management')}"}, timeout=30)
    assert management.status_code == 200, management.text


def test_metrics_port_is_published(container):
    resp = requests.get(f"{container.metrics}/metrics", timeout=30)
    assert resp.status_code == 200 and "ts_inference_requests_total" in resp.text


def test_health_check_passes(container):
    done = image.podman("healthcheck", "run", container.name, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_runs_as_non_root_without_torchvision(container):
    ids = image.podman("exec", container.name, "id", "-u").stdout.strip()
    assert ids != "0"
    probe = "import importlib.util as u; print(u.find_spec('torchvision') is None, u.find_spec('sympy') is None)"
    assert image.podman("exec", container.name, "python", "-c", probe).stdout.split() == ["True", "True"]
    # Every process in the container (the supervisor, nginx, Java, the workers, this shell) is the image's user.
    owners = image.podman("exec", container.name, "sh", "-c", "stat -c %u /proc/[0-9]*", check=False).stdout.split()
    assert owners and set(owners) == {ids}


def test_keys_are_the_service_credentials(container):
    keys = json.loads(image.podman("exec", container.name, "cat", image.KEY_FILE).stdout)
    assert set(keys) >= {"inference", "management"}
    # scripts.ops.ctl / client inside the container read <app>/key_file.json: it is the same file.
    linked = json.loads(image.podman("exec", container.name, "cat", "/srv/app/key_file.json").stdout)
    assert linked == keys


def test_sigterm_stops_everything_cleanly(container):
    # Last test of the module: a graceful stop exits 0 well within podman's grace period.
    done = image.podman("stop", "--time", "60", container.name, timeout=120)
    assert done.returncode == 0
    state = image.podman("inspect", "--format", "{{.State.ExitCode}}", container.name).stdout.strip()
    assert state == "0", container.logs()
