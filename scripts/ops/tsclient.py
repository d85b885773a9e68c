"""A small, token-aware client for TorchServe's inference, management and metrics APIs.

Keys come from ``key_file.json`` (written by TorchServe into the directory it
was started from). Inference and management keys expire (60 minutes by
default); when the server answers "Token Authorization failed" the client asks
the token API for a new key with the API key, re-reads the key file and retries
once.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests

REPO = Path(__file__).resolve().parents[2]  # scripts/<package>/<module>.py -> the repository
TOKEN_FAILED = "Token Authorization failed"
# One lock per key file: threads sharing a key file renew it one at a time.
_RENEW_LOCKS: dict[Path, threading.Lock] = {}
_RENEW_LOCKS_GUARD = threading.Lock()


def _renew_lock(path: Path) -> threading.Lock:
    with _RENEW_LOCKS_GUARD:
        return _RENEW_LOCKS.setdefault(path.resolve(), threading.Lock())


def read_properties(path: Path) -> dict[str, str]:
    """Parse a Java-style .properties file (the subset TorchServe uses)."""
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        props[key.strip()] = value.strip().replace("\\\\", "\\")
    return props


@dataclass
class Endpoints:
    inference: str = "http://127.0.0.1:8080"
    management: str = "http://127.0.0.1:8081"
    metrics: str = "http://127.0.0.1:8082"

    @classmethod
    def from_config(cls, path: Path) -> Endpoints:
        props = read_properties(path)
        return cls(
            props.get("inference_address", cls.inference),
            props.get("management_address", cls.management),
            props.get("metrics_address", cls.metrics),
        )

    def is_local(self) -> bool:
        """True when the management API is on this machine (worker pids are ours to inspect)."""
        host = urlparse(self.management).hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def model_store(config: Path, workdir: Path | None = None) -> Path:
    """The config's ``model_store``, resolved like TorchServe does (against the server's cwd)."""
    store = Path(read_properties(config).get("model_store", "model_store"))
    return store if store.is_absolute() else (workdir or config.parent) / store


class ApiError(RuntimeError):
    def __init__(self, response: requests.Response):
        self.response = response
        self.status = response.status_code
        try:
            body = response.json()
            message = body.get("message", response.text) if isinstance(body, dict) else response.text
        except ValueError:
            message = response.text
        super().__init__(f"HTTP {self.status} from {response.request.method} {response.url}: {message.strip()}")


class TorchServeClient:
    def __init__(self, endpoints: Endpoints | None = None, key_file: Path | None = None, timeout: float = 60.0):
        self.endpoints = endpoints or Endpoints()
        self.key_file = Path(key_file) if key_file else REPO / "key_file.json"
        self.timeout = timeout
        self.session = requests.Session()
        self.renewals = 0

    @classmethod
    def from_config(cls, config: Path | None = None, workdir: Path | None = None, **kw) -> TorchServeClient:
        """Addresses from config.properties; keys from ``workdir``/key_file.json (the server's cwd)."""
        config = config or REPO / "config.properties"
        workdir = workdir or config.parent
        return cls(Endpoints.from_config(config), workdir / "key_file.json", **kw)

    # --- keys -------------------------------------------------------------
    def keys(self) -> dict:
        """The key file's content, or {} when token authorization is off (no file).

        TorchServe rewrites the file in place when a key is renewed; a read that
        lands mid-write is retried briefly.
        """
        for attempt in range(20):
            try:
                return json.loads(self.key_file.read_text())
            except FileNotFoundError:
                return {}
            except ValueError:
                if attempt == 19:
                    raise
                time.sleep(0.05)
        return {}

    def key(self, kind: str) -> str | None:
        entry = self.keys().get(kind)
        return entry.get("key") if isinstance(entry, dict) else None

    def renew(self, kind: str, stale: str | None = None) -> str:
        """Ask the token API for a new ``inference`` or ``management`` key; returns it.

        ``stale`` is the key that was refused: if the key file already holds
        another one (a concurrent client renewed it), that one is used as is, so
        clients sharing a key file do not invalidate each other's fresh keys.
        """
        with _renew_lock(self.key_file):
            current = self.key(kind)
            if stale is not None and current is not None and current != stale:
                return current
            api_key = self.key("API")
            if api_key is None:
                raise RuntimeError(f"cannot renew the {kind} key: no API key in {self.key_file}")
            resp = self.session.get(
                f"{self.endpoints.management}/token", params={"type": kind},
                headers={"Authorization": f"Bearer {api_key}"}, timeout=self.timeout,
            )
            if resp.status_code != 200:
                raise ApiError(resp)
            self.renewals += 1
            return self.key(kind)

    # --- requests ---------------------------------------------------------
    def request(self, api: str, method: str, path: str, *, check: bool = True, **kw) -> requests.Response:
        """Call ``api`` (inference / management / metrics) with the right key, renewing it once if expired."""
        kind = {"inference": "inference", "management": "management", "feedback": "feedback"}.get(api)
        # "feedback": the gateway's /feedback routes on the inference address, with the feedback key
        url = (self.endpoints.inference if api == "feedback" else getattr(self.endpoints, api)) + path
        headers = dict(kw.pop("headers", None) or {})
        timeout = kw.pop("timeout", self.timeout)
        for attempt in (0, 1):
            key = self.key(kind) if kind else None
            auth = {"Authorization": f"Bearer {key}"} if key else {}
            resp = self.session.request(method, url, headers={**headers, **auth}, timeout=timeout, **kw)
            expired = kind in ("inference", "management") and resp.status_code in (400, 401) and TOKEN_FAILED in resp.text
            if attempt == 0 and expired and self.key("API"):
                self.renew(kind, stale=key)
                continue
            break
        if check and resp.status_code >= 400:
            raise ApiError(resp)
        return resp

    def ping(self) -> dict:
        return self.request("inference", "GET", "/ping").json()

    def predict(self, model: str, data: bytes, *, version: str | None = None, headers: dict | None = None,
                content_type: str = "application/octet-stream", explain: bool = False, check: bool = True) -> requests.Response:
        route = "explanations" if explain else "predictions"
        path = f"/{route}/{model}" + (f"/{version}" if version else "")
        hdrs = {"Content-Type": content_type, **(headers or {})}
        return self.request("inference", "POST", path, data=data, headers=hdrs, check=check)

    def models(self) -> list[dict]:
        return self.request("management", "GET", "/models").json()["models"]

    def describe(self, model: str, version: str | None = None) -> list[dict]:
        """All versions of ``model`` (or only ``version``), one dict each, as TorchServe describes them."""
        path = f"/models/{model}" + (f"/{version}" if version else "/all")
        return self.request("management", "GET", path).json()

    def default_version(self, model: str) -> str:
        """The version that /predictions/{model} goes to (GET /models/{model} describes only that one)."""
        return self.request("management", "GET", f"/models/{model}").json()[0]["modelVersion"]

    def register(self, url: str, workers: int, timeout: float = 240) -> dict:
        """POST /models: load an archive from the model store (needs enable_model_api=true)."""
        params = {"url": url, "initial_workers": workers, "synchronous": "true"}
        return self.request("management", "POST", "/models", params=params, timeout=timeout).json()

    def model_api_enabled(self) -> bool:
        """Whether register/unregister are allowed (enable_model_api=true), probed with an empty POST /models.

        TorchServe 0.12 answers 405 when the model API is off and 400 (no url) when it is on.
        """
        resp = self.request("management", "POST", "/models", check=False)
        if resp.status_code in (400, 405):
            return resp.status_code == 400
        raise ApiError(resp)

    def unregister(self, model: str, version: str) -> dict:
        """DELETE /models/{model}/{version} (needs enable_model_api=true; never the default version)."""
        return self.request("management", "DELETE", f"/models/{model}/{version}", timeout=120).json()

    def scale(self, model: str, workers: int, version: str | None = None, timeout: float = 180,
              prefix: str = "", force: bool = False) -> dict:
        """Set min = max = ``workers`` and wait until they are up (never the bare PUT).

        ``prefix`` addresses one replica behind the gateway (``/replicas/<i>``); ``force``
        tells the gateway that 0 workers (an outage) is meant.
        """
        path = f"{prefix}/models/{model}" + (f"/{version}" if version else "")
        params = {"min_worker": workers, "max_worker": workers, "synchronous": "true", "timeout": int(timeout)}
        if force:
            params["force"] = "true"
        return self.request("management", "PUT", path, params=params, timeout=timeout + 10).json()

    def set_default(self, model: str, version: str, prefix: str = "") -> dict:
        return self.request("management", "PUT", f"{prefix}/models/{model}/{version}/set-default").json()

    def metrics_text(self) -> str:
        return self.request("metrics", "GET", "/metrics").text

    # --- labelled feedback (the gateway's /feedback routes; docs/operations.md, "Labelled feedback") ---------
    def label(self, model: str, labels: dict | list, check: bool = True) -> requests.Response:
        """POST /feedback/<model>: one label {"request_id", "label"[, "index"]} or a list, with the feedback key."""
        return self.request("feedback", "POST", f"/feedback/{model}", json=labels, check=check)

    def feedback_summary(self, model: str, api: str = "management") -> dict:
        """Labelled accuracy per version: with the management key (management port) or the feedback key."""
        return self.request(api, "GET", f"/feedback/{model}/summary").json()


_SAMPLE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> [(name, labels, value)] (comments skipped)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def wait_ready(client: TorchServeClient, model: str, image: bytes, deadline_s: float = 180.0,
               alive=lambda: True) -> dict:
    """Poll until ``model`` answers a real prediction for ``image``; return that answer.

    ``alive`` is checked between polls so a server that died fails fast instead of
    waiting out the deadline. Raises TimeoutError with the last error seen.
    """
    import time

    start, last = time.monotonic(), "no attempt yet"
    while time.monotonic() - start < deadline_s:
        if not alive():
            raise RuntimeError(f"TorchServe exited while waiting for {model} (last: {last})")
        try:
            resp = client.predict(model, image, check=False)
            if resp.status_code == 200 and "label" in resp.json():
                return resp.json()
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except (requests.RequestException, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise TimeoutError(f"{model} did not answer a prediction within {deadline_s:.0f} s (last: {last})")
