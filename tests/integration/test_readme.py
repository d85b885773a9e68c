"""The README's commands, run as written against the real stack `make serve` starts (only addresses and key path swapped)."""

from __future__ import annotations

import json
import re
import subprocess

from scripts.deploy.harness import REPO


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    marker = text.index("<!-- readme-test")
    return re.search(r"```bash\n(.*?)```", text[marker:], re.S).group(1)


def test_readme_curl_commands_work_as_documented(gateway):
    script = readme_block()
    assert "http://127.0.0.1:8080/predictions/fashion_cnn" in script and 'open("key_file.json")' in script
    for default, actual in (("http://127.0.0.1:8080", gateway.inference), ("http://127.0.0.1:8081", gateway.management),
                            ("http://127.0.0.1:8082", gateway.metrics), ('open("key_file.json")', f'open("{gateway.key_file}")')):
        script = script.replace(default, actual)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.replace("}{", "}\n{").splitlines() if line.strip()]
    assert len(answers) == 4
    boot, coat, sneaker, error = answers
    assert boot["label"] == "Ankle boot" and boot["tta_views"] == 1 and len(boot["top_k"]) == 3  # confident: gated to 1
    assert coat["label"] == "Coat" and coat["tta_views"] == 1 and len(coat["top_k"]) == 5
    assert sneaker["label"] == "Sneaker" and len(sneaker["top_k"]) == 2
    assert error["code"] == 415 and error["type"] == "UnsupportedMediaType" and "Accepted formats" in error["message"]


def test_readme_example_answer_is_what_the_server_returns(gateway):
    client = gateway.client()
    text = (REPO / "README.md").read_text()
    documented = json.loads(re.search(r"An answer:\n\n```json\n(.*?)```", text, re.S).group(1))
    actual = client.predict("fashion_cnn", (REPO / "examples" / "ankle_boot.png").read_bytes()).json()
    assert set(actual) == set(documented)
    assert actual["label"] == documented["label"] and actual["tta_views"] == documented["tta_views"]
    assert abs(actual["confidence"] - documented["confidence"]) < 0.02
