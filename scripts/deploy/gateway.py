"""The nginx gateway: its configuration, rendered from deploy/gateway/nginx.conf.template, and its process.

Everything the template needs comes from one place each: the public addresses and
the body limit from config.properties, the worker cap from scripts/deploy/capacity.py,
the service credentials from key_file.json (written here), each replica's address and
TorchServe keys from the replica itself. The rendered file lives in the run folder,
readable by its owner only, because it holds keys.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from scripts.deploy.capacity import Capacity

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "deploy" / "gateway" / "nginx.conf.template"
KEY_BYTES = 32  # 256 random bits a credential (the issue asks for at least 128)
VALID_KEY = re.compile(r"[A-Za-z0-9_-]{22,}")  # 22 base64url characters = 132 bits; also safe inside nginx's config

# Errors nginx itself produces, as JSON with a message that says what to do.
ERRORS = {
    400: ("bad_request", "BadRequest", "The request could not be read (headers too large or malformed)."),
    401: ("unauthorized", "Unauthorized",
          "Send the service credential: Authorization: Bearer <key> (inference key from key_file.json "
          "for /predictions, management key for the management port)."),
    403: ("forbidden", "Forbidden", "This credential may not use this route."),
    404: ("not_found", "NotFound", "Unknown route. Inference: POST /predictions/<model>[/<version>] or "
          "/explanations/<model>[/<version>]; readiness: GET /ping."),
    405: ("method_not_allowed", "MethodNotAllowed", "Send the image with POST (or PUT) to this route."),
    408: ("timeout", "RequestTimeout", "The request was not received in time; send headers and body promptly."),
    413: ("too_large", "PayloadTooLarge", "The body is over the limit of @{max_body} bytes."),
    429: ("too_many_failures", "TooManyRequests",
          "Too many requests with a wrong or missing credential from this client; wait and retry with the right key."),
    503: ("busy", "ServiceUnavailable", "Too many large uploads in flight at once; retry after the Retry-After delay."),
}
RETRY_AFTER = {429: 60, 503: 1}
MANAGEMENT_TIMEOUT_S = 300  # `ctl scale` waits synchronously for workers (180 s by default)


@dataclass
class ReplicaRoute:
    """How the gateway reaches one replica (TorchServe's own loopback ports and keys)."""

    index: int
    inference: str  # http://127.0.0.1:port
    management: str
    metrics: str
    inference_key: str
    management_key: str
    down: bool = False  # out of rotation (not ready) while another replica is


@dataclass
class GatewaySettings:
    run_dir: Path
    log_dir: Path
    public_inference: str  # host:port
    public_management: str
    public_metrics: str
    max_body: int  # bytes: config.properties' max_request_size
    capacity: Capacity
    large_bodies: int = 4  # large bodies in flight at once, per gateway
    read_timeout_s: int = 30  # a prediction takes milliseconds; a frozen worker should not hold a client longer
    tries: int = 3
    retry_window_s: int = 60
    auth_failure_rate: str = "30r/m"
    auth_failure_burst: int = 20
    access_log: str = "file"  # "file": <log_dir>/gateway_access.log (rotated by the supervisor); "stdout": a container's log
    replicas: list[ReplicaRoute] = field(default_factory=list)


# --- service credentials ----------------------------------------------------------------------------
def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def service_keys(key_file: Path) -> dict:
    """The service credentials in ``key_file`` (TorchServe's key-file format); new ones if absent or weak.

    Clients keep reading ``inference.key`` / ``management.key`` from this file as they did
    when TorchServe wrote it. Keys made here do not expire and survive restarts; delete the
    file (or run ``make rotate-keys``) to replace them.
    """
    if key_file.exists():
        try:
            keys = json.loads(key_file.read_text())
            if all(VALID_KEY.fullmatch(keys[kind]["key"]) for kind in ("inference", "management")):
                return keys
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if not os.access(key_file, os.W_OK):  # a mounted Secret, say: not ours to replace
            raise ValueError(f"{key_file} holds no valid service keys: it needs inference.key and management.key, "
                             "each 22 or more characters of [A-Za-z0-9_-] (128+ bits). Generate them with "
                             "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'.")
    keys = {kind: {"key": new_key(), "expiration time": "never (gateway credential)"}
            for kind in ("management", "inference")}
    write_private(key_file, json.dumps(keys, indent=2) + "\n")
    return keys


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


# --- rendering ----------------------------------------------------------------------------------------
def _hostport(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def _allowed_counts(cap: int) -> str:
    return "|".join(str(n) for n in range(1, cap + 1))


def _error_locations(settings: GatewaySettings) -> str:
    blocks = []
    for code, (name, kind, message) in ERRORS.items():
        message = message.replace("@{max_body}", str(settings.max_body))
        extra = f"add_header Retry-After {RETRY_AFTER[code]} always; " if code in RETRY_AFTER else ""
        if code == 401:
            extra += 'add_header WWW-Authenticate "Bearer" always; '
        body = json.dumps({"code": code, "type": kind, "message": message})
        blocks.append(f"        location @{name} {{ default_type application/json; add_header X-Request-ID $req_id always; "
                      f"{extra}return {code} '{body}'; }}")
    return "\n".join(blocks)


def _proxy_headers(authorization: str | None) -> str:
    auth = f'"Bearer {authorization}"' if authorization else '""'
    return ('proxy_set_header X-Request-ID $req_id; proxy_set_header Connection ""; '
            f"proxy_set_header Authorization {auth};")


def _replica_blocks(settings: GatewaySettings) -> tuple[str, str, str, str]:
    run = settings.run_dir
    servers, hops, mgmt, metrics = [], [], [], []
    # One replica is listed twice so that a retry (a dead worker) goes back to it: its other workers answer.
    single = len(settings.replicas) == 1
    for r in settings.replicas:
        sock = f"unix:{run}/replica-{r.index}.sock"
        entries = 2 if single else 1
        fails = "max_fails=0" if single else "max_fails=3 fail_timeout=5s"
        servers += [f"        server {sock} {fails}{' down' if r.down else ''};"] * entries
        hops.append(f"""
    upstream torchserve_{r.index} {{
        server {_hostport(r.inference)};
        keepalive 32;
    }}
    # Replica {r.index}: injects its TorchServe key; a dead worker's 507 becomes a 502 the front retries.
    server {{
        listen {sock};
        location / {{
            proxy_pass http://torchserve_{r.index};
            {_proxy_headers(r.inference_key)}
            proxy_request_buffering off;
            proxy_intercept_errors on;
            error_page 507 = @worker_died;
        }}
        location @worker_died {{
            return 502 '{{"code":502,"type":"WorkerDied","message":"The worker died with this request in its batch; the gateway retries it."}}';
        }}
    }}""")
        refuse = "if ($scale_refused) { return 400 '" + _json_text_obj(settings) + "'; }"
        # The path is rewritten (nginx escapes it again, so an encoded "?" stays in the path) and proxied
        # without a URI part; synchronous scaling may take minutes, hence the longer read timeout.
        route = f"""
        location ~ ^/replicas/{r.index}/models(/.*)?$ {{
            {refuse}
            rewrite ^/replicas/{r.index}(/models.*)$ $1 break;
            proxy_pass http://{_hostport(r.management)};
            proxy_read_timeout {MANAGEMENT_TIMEOUT_S}s;
            {_proxy_headers(r.management_key)}
        }}"""
        if r.index == 0:
            route += f"""
        # Unprefixed management calls address replica 0 (with one replica: the whole service).
        location ~ ^/models(/.*)?$ {{
            {refuse}
            proxy_pass http://{_hostport(r.management)};
            proxy_read_timeout {MANAGEMENT_TIMEOUT_S}s;
            {_proxy_headers(r.management_key)}
        }}"""
        mgmt.append(route)
        metrics.append(f"        location = /replicas/{r.index}/metrics {{ proxy_pass http://{_hostport(r.metrics)}/metrics; }}")
    return "\n".join(servers), "\n".join(hops), "\n".join(mgmt), "\n".join(metrics)


def _json_text_obj(settings: GatewaySettings) -> str:
    body = {"code": 400, "type": "WorkerLimit", "message": settings.capacity.refusal_message()}
    return json.dumps(body).replace("'", "\\'").replace("$", "")


def render(settings: GatewaySettings, keys: dict) -> str:
    servers, hops, mgmt, metrics = _replica_blocks(settings)
    user_line = "user root root;" if os.geteuid() == 0 else "# (runs as the invoking user)"
    values = {
        "user_line": user_line,
        "nofile": str(open_files_limit()),
        "connections": str(max(1024, open_files_limit() - 512)),
        "run": str(settings.run_dir),
        "access_log": ("/dev/stdout" if settings.access_log == "stdout"
                       else str(settings.log_dir / "gateway_access.log")),
        "public_inference": settings.public_inference,
        "public_management": settings.public_management,
        "public_metrics": settings.public_metrics,
        "max_body": str(settings.max_body),
        "inference_key": keys["inference"]["key"],
        "management_key": keys["management"]["key"],
        "auth_failure_rate": settings.auth_failure_rate,
        "auth_failure_burst": str(settings.auth_failure_burst),
        "large_bodies": str(settings.large_bodies),
        "allowed_counts": _allowed_counts(settings.capacity.cap),
        "read_timeout": f"{settings.read_timeout_s}s",
        "tries": str(settings.tries),
        "retry_window": f"{settings.retry_window_s}s",
        "replica_servers": servers,
        "replica_hops": hops,
        "management_routes": mgmt,
        "metrics_routes": metrics,
        "error_locations": _error_locations(settings),
    }
    text = TEMPLATE.read_text()
    missing = sorted(set(re.findall(r"@\{(\w+)\}", text)) - set(values))
    if missing:
        raise KeyError(f"{TEMPLATE}: no value for {missing}")
    return re.sub(r"@\{(\w+)\}", lambda m: values[m.group(1)], text)


def open_files_limit() -> int:
    """Connections nginx may hold: its worker_rlimit_nofile, within what this process may raise it to."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return min(32768, hard if hard != resource.RLIM_INFINITY else 32768)


# --- the process -------------------------------------------------------------------------------------
def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise FileNotFoundError("nginx is not installed: `apt-get install nginx-light` (make serve installs it)")
    return found


class Gateway:
    """One nginx master serving the rendered config from ``run_dir``."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.conf = settings.run_dir / "nginx.conf"
        self.pid_file = settings.run_dir / "nginx.pid"

    def write(self, keys: dict) -> None:
        run = self.settings.run_dir
        for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        candidate = self.conf.with_name("nginx.conf.new")  # the running config is replaced only by a valid one
        write_private(candidate, render(self.settings, keys))
        check = subprocess.run([nginx_binary(), "-t", "-q", "-c", str(candidate), "-p", str(run), "-e", str(run / "error.log")],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused the rendered config {candidate}:\n{check.stderr.strip()}")
        os.replace(candidate, self.conf)

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start(self) -> int:
        run = self.settings.run_dir
        subprocess.run([nginx_binary(), "-c", str(self.conf), "-p", str(run), "-e", str(run / "error.log")],
                       check=True, capture_output=True)
        for _ in range(100):
            pid = self.pid()
            if pid:
                return pid
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not start; see {run / 'error.log'}")

    def reload(self) -> None:
        pid = self.pid()
        if pid:
            os.kill(pid, signal.SIGHUP)

    def reopen_logs(self) -> None:
        pid = self.pid()
        if pid:
            os.kill(pid, signal.SIGUSR1)

    def stop(self, timeout: float = 10.0) -> None:
        pid = self.pid()
        if not pid:
            return
        os.kill(pid, signal.SIGQUIT)  # graceful: finish in-flight requests
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid():
            time.sleep(0.1)
        if self.pid():
            os.kill(pid, signal.SIGTERM)
