"""The nginx gateway and its per-replica hops: their configurations and their processes.

Two kinds of nginx, each a master of its own:

- the **gateway** (deploy/gateway/nginx.conf.template): the public ports, credentials, limits,
  retries and worker cap. It reaches replica ``i`` only through the hop's Unix sockets in the
  run folder, whose names never change, so its configuration is fixed for the life of the
  stack and it is never reloaded while it serves (a reload would close the clients' idle
  keep-alive connections, and a POST sent on one at that moment is lost);
- one **hop** per replica (deploy/gateway/hop.conf.template): injects that replica's TorchServe
  keys and points at its current ports. A replica's restart (new ports, new keys) or readiness
  change re-renders and reloads its hop only; a hop out of rotation answers predictions 503
  at once, which the gateway retries on another replica.

Everything the templates need comes from one place each: the public addresses and the
body limit from config.properties, the worker cap from scripts/ops/capacity.py, the
service credentials from key_file.json (written here), each replica's address and
TorchServe keys from the replica itself. The rendered files live in the run folder,
readable by their owner only, because they hold keys.
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

import psutil

from scripts.ops.capacity import Capacity

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "deploy" / "gateway" / "nginx.conf.template"
HOP_TEMPLATE = REPO / "deploy" / "gateway" / "hop.conf.template"
KEY_BYTES = 32  # 256 random bits a credential (the issue asks for at least 128)
VALID_KEY = re.compile(r"[A-Za-z0-9_-]{22,}")  # 22 base64url characters = 132 bits; also safe inside nginx's config

# Errors nginx itself produces, as JSON with a message that says what to do.
ERRORS = {
    400: ("bad_request", "BadRequest", "The request could not be read (headers too large or malformed)."),
    401: ("unauthorized", "Unauthorized",
          "Send the service credential: Authorization: Bearer <key> (inference key from key_file.json "
          "for /predictions, feedback key for /feedback, management key for the management port)."),
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
# The same errors on the Open Inference Protocol routes (/v2...), in its shape {"error": "..."}, which v2 clients
# (tritonclient, kserve) read; nginx's own 502/504 there too (TorchServe's answers pass through).
V2_MESSAGES = {
    404: "Unknown v2 route. Served: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/<model>[/versions/<v>] "
         "and its /ready; POST /v2/models/<model>[/versions/<v>]/infer.",
    405: "Use GET for /v2, metadata and readiness, and POST for /v2/models/<model>[/versions/<v>]/infer.",
    502: "No replica answered this request (every try failed); retry in a few seconds.",
    504: "The model did not answer in time; retry in a few seconds.",
}
# nginx's own errors on the public gRPC port, as gRPC statuses (a client error is never INTERNAL or UNAVAILABLE).
GRPC_STATUS = {400: 3, 401: 16, 403: 7, 404: 12, 405: 12, 408: 4, 413: 8, 429: 8, 502: 14, 503: 14, 504: 4}
GRPC_MESSAGES = {
    404: "Not served here: the public gRPC port serves inference.GRPCInferenceService (KServe's Open Inference "
         "Protocol: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer).",
    405: "Not a gRPC call.",
    502: "The gRPC service is restarting; retry in a few seconds.",
    503: "The gRPC service is restarting; retry in a few seconds.",
    504: "The model did not answer in time; retry in a few seconds.",
}
GRPC_SOCKET = "grpc.sock"  # run/grpc.sock: scripts/deploy/grpc_service.py, reached only through the gateway
FEEDBACK_SOCKET = "feedback.sock"  # run/feedback.sock: scripts/deploy/recorder.py, reached only through the gateway
SHADOW_SOCKET = "shadow.sock"  # run/shadow.sock: scripts/deploy/shadow.py, the shadow's fire-and-forget sink
SHADOW_CONNECT_TIMEOUT_MS = 100  # a hop waits at most this for the sink (which answers before it forwards anything)
SHADOW_READ_TIMEOUT_MS = 500
KEY_KINDS = ("inference", "management", "feedback")
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


@dataclass(frozen=True)
class TrafficSplit:
    """A gradual rollout as every hop applies it (scripts/deploy/traffic.py keeps the state).

    ``shadow``: each prediction of ``model``'s default version is also sent, by nginx's ``mirror``, to the
    shadow sink (run/shadow.sock), which answers at once and forwards it to ``candidate`` (``percent`` of them: a
    sample, to bound the candidate's cost); ``canary``: ``percent`` of them go to ``candidate`` instead (split_clients
    on nginx's own random request id)."""

    model: str
    candidate: str
    mode: str  # "shadow" | "canary"
    percent: float = 0.0


@dataclass
class HopSettings:
    """What replica ``index``'s hop serves: its route (None until it has written its keys) and whether it is in rotation."""

    run_dir: Path
    index: int
    route: ReplicaRoute | None
    serving: bool = True  # False: predictions answered 503 at once, so the gateway tries another replica
    why: str = ""  # why it is out of rotation, in the 503's message: "restarting", "not ready"
    read_timeout_s: int = 30
    split: TrafficSplit | None = None  # a shadow or canary rollout in progress (the same on every hop)


@dataclass
class GatewaySettings:
    run_dir: Path
    log_dir: Path
    public_inference: str  # host:port
    public_management: str
    public_metrics: str
    max_body: int  # bytes: config.properties' max_request_size
    capacity: Capacity
    large_bodies: int = 4  # large bodies (4 MB up to the body limit, or chunked) in flight at once, per gateway
    photo_bodies: int = 16  # phone-photo bodies (1 MB to 4 MB) in flight at once, per gateway
    read_timeout_s: int = 30  # a prediction takes milliseconds; a frozen worker should not hold a client longer
    tries: int = 3
    retry_window_s: int = 60
    auth_failure_rate: str = "30r/m"
    auth_failure_burst: int = 20
    access_log: str = "file"  # "file": <log_dir>/gateway_access.log (rotated by the supervisor); "stdout": a container's log
    replicas: list[int] = field(default_factory=list)  # replica indices; each is reached through its hop's sockets
    public_grpc: str | None = None  # host:port of KServe's gRPC service (config.properties' grpc_inference_*); None: not served
    feedback: str = ""  # why /feedback is closed ("" = served by the recorder on run/feedback.sock)


# --- service credentials ----------------------------------------------------------------------------
def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def _writable(path: Path) -> bool:
    """Ours to rewrite: writable for us and not a read-only file (a mounted Secret is 0440, even for root)."""
    try:
        return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)
    except OSError:
        return False


def _valid(keys: dict, kind: str) -> bool:
    try:
        return bool(VALID_KEY.fullmatch(keys[kind]["key"]))
    except (KeyError, TypeError):
        return False


def service_keys(key_file: Path) -> dict:
    """The service credentials in ``key_file`` (TorchServe's key-file format); new ones if absent or weak.

    Clients keep reading ``inference.key`` / ``management.key`` from this file as they did
    when TorchServe wrote it; labellers read ``feedback.key`` (a file written before the feedback
    API gains one, the other keys kept). Keys made here do not expire and survive restarts; delete
    the file to replace them. A read-only file (a mounted Secret) without a feedback key serves
    everything but ``/feedback``, which answers 503 saying so.
    """
    keys = None
    if key_file.exists():
        try:
            keys = json.loads(key_file.read_text())
        except (OSError, ValueError):
            keys = None
        if isinstance(keys, dict) and all(_valid(keys, kind) for kind in ("inference", "management")):
            if _valid(keys, "feedback") or not _writable(key_file):
                return keys
            keys = {**keys, "feedback": {"key": new_key(), "expiration time": "never (gateway credential)"}}
            write_private(key_file, json.dumps(keys, indent=2) + "\n")
            return keys
        if not _writable(key_file):  # a mounted Secret, say: not ours to replace
            raise ValueError(f"{key_file} holds no valid service keys: it needs inference.key and management.key "
                             "(and feedback.key for /feedback), each 22 or more characters of [A-Za-z0-9_-] (128+ bits). "
                             "Generate them with python3 -c 'import secrets; print(secrets.token_urlsafe(32))'.")
    keys = {kind: {"key": new_key(), "expiration time": "never (gateway credential)"}
            for kind in ("management", "inference", "feedback")}
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


def _answer(code: int, kind: str, message: str) -> str:
    """nginx's `return CODE '{json}';` for a JSON error body (a quote in the message is escaped for nginx)."""
    return "return " + str(code) + " '" + json.dumps({"code": code, "type": kind, "message": message}).replace("'", "\\'") + "';"


def _error_locations(settings: GatewaySettings) -> str:
    blocks = []
    for code, (name, kind, message) in ERRORS.items():
        message = message.replace("@{max_body}", str(settings.max_body))
        extra = f"add_header Retry-After {RETRY_AFTER[code]} always; " if code in RETRY_AFTER else ""
        if code == 401:
            extra += 'add_header WWW-Authenticate "Bearer" always; '
        blocks.append(f"        location @{name} {{ default_type application/json; add_header X-Request-ID $req_id always; "
                      f"{extra}{_answer(code, kind, message)} }}")
    return "\n".join(blocks)


def _v2_answer(code: int, message: str) -> str:
    """nginx's `return CODE '{"error": ...}';`: an error in the Open Inference Protocol's shape."""
    return "return " + str(code) + " '" + json.dumps({"error": message}).replace("'", "\\'") + "';"


def _v2_codes(settings: GatewaySettings) -> dict[int, str]:
    codes = {code: (V2_MESSAGES.get(code) or message).replace("@{max_body}", str(settings.max_body))
             for code, (_, _, message) in ERRORS.items()}
    return {**codes, **{code: message for code, message in V2_MESSAGES.items() if code not in codes}}


def _v2_error_locations(settings: GatewaySettings) -> str:
    blocks = []
    for code, message in sorted(_v2_codes(settings).items()):
        extra = f"add_header Retry-After {RETRY_AFTER[code]} always; " if code in RETRY_AFTER else ""
        if code == 401:
            extra += 'add_header WWW-Authenticate "Bearer" always; '
        blocks.append(f"        location @v2_{code} {{ default_type application/json; add_header X-Request-ID $req_id always; "
                      f"{extra}{_v2_answer(code, message)} }}")
    return "\n".join(blocks)


def _v2_error_pages(settings: GatewaySettings) -> str:
    return "\n".join(f"            error_page {code} = @v2_{code};" for code in sorted(_v2_codes(settings)))


def _grpc_server(settings: GatewaySettings) -> str:
    """The public gRPC port: KServe's inference.GRPCInferenceService, proxied to run/grpc.sock over HTTP/2."""
    if not settings.public_grpc:
        return "    # --- gRPC: not served (no public gRPC address) ---"
    run = settings.run_dir
    errors = []
    for code, status in GRPC_STATUS.items():
        message = GRPC_MESSAGES.get(code) or ERRORS[code][2].replace("@{max_body}", str(settings.max_body))
        message = message.replace("Authorization: Bearer <key>", "the metadata authorization: Bearer <key>")
        extra = f"add_header Retry-After {RETRY_AFTER[code]} always; " if code in RETRY_AFTER else ""
        # A gRPC error nginx answers itself: HTTP 200 with grpc-status and grpc-message and no message.
        errors.append(f"        location @grpc_{code} {{ default_type application/grpc; add_header grpc-status {status} always; "
                      f"add_header grpc-message \"{message}\" always; add_header X-Request-ID $req_id always; {extra}"
                      f"return 204; }}")
    pages = "\n".join(f"        error_page {code} = @grpc_{code};" for code in GRPC_STATUS)
    return rf"""    # --- public gRPC: KServe's inference.GRPCInferenceService ----------------------------------------
    # Each call goes to run/{GRPC_SOCKET} (scripts/deploy/grpc_service.py), which sends it to the REST v2 routes
    # of the inference port above with the caller's credential: answers, limits and errors are those of REST.
    # Health calls need no credential (as /v2/health/* and /v2/models/<m>/ready); the others are checked here,
    # before their message is read, with the same failure limit as REST.
    server {{
        listen {settings.public_grpc} http2 reuseport;
{pages}
        grpc_set_header X-Request-ID $req_id;
        grpc_connect_timeout 5s;
        grpc_read_timeout {2 * settings.read_timeout_s}s;  # the REST request it turns into may be retried
        grpc_send_timeout 60s;

        location ~ ^/inference\.GRPCInferenceService/(ServerLive|ServerReady|ModelReady)$ {{
            grpc_pass unix:{run / GRPC_SOCKET};
        }}
        location ~ ^/inference\.GRPCInferenceService/(ServerMetadata|ModelMetadata|ModelInfer)$ {{
            limit_req zone=inference_auth_failures burst={settings.auth_failure_burst} nodelay;
            auth_request /_auth/inference;
            grpc_pass unix:{run / GRPC_SOCKET};
        }}
        location = /_auth/inference {{
            internal;
            # With a body, the 401 is this subrequest's own answer; without, this server's error_page 401 (a gRPC
            # status, sent as HTTP 204) would answer the subrequest and auth_request would let the call through.
            if ($inference_ok = 0) {{ return 401 "unauthorized"; }}
            return 204;
        }}
        location / {{
            return 404;
        }}
{chr(10).join(errors)}
    }}"""


def _feedback_map(keys: dict) -> str:
    """$feedback_ok: the feedback key (labellers); with none in the key file, nothing matches."""
    key = keys.get("feedback", {}).get("key") if _valid(keys, "feedback") else None
    match = f'"~^Bearer {key}$" 1; ' if key else ""
    return (f"    map $http_authorization $feedback_ok {{ {match}default 0; }}\n"
            "    map $feedback_ok $feedback_fail_key { 1 \"\"; default $binary_remote_addr; }")


def _feedback_routes(settings: GatewaySettings, keys: dict, api: str) -> str:
    """/feedback/<model> on the inference port (the feedback key) or the management port (its key: summary, export)."""
    closed = settings.feedback or ("" if _valid(keys, "feedback") else
                                   "the key file has no feedback key (feedback.key): add one and restart")
    if closed:
        message = f"Feedback is not served here: {closed}."
        return f"        location /feedback/ {{ default_type application/json; {_answer(503, 'FeedbackUnavailable', message)} }}"
    down = _answer(503, "FeedbackUnavailable", "The feedback service (the recorder) is restarting; retry in a few seconds.")
    # A location's own proxy_set_header and error_page drop the server's: the ones that matter are repeated.
    pages = " ".join(f"error_page {code} = @{ERRORS[code][0]};" for code in (400, 401, 403, 405, 408, 429))
    common = (f'proxy_set_header Connection ""; proxy_set_header Authorization ""; proxy_set_header X-Request-ID $req_id; '
              f'proxy_set_header X-Readiness-Probe ""; proxy_set_header X-Feedback-Api {api};\n'
              f"            proxy_read_timeout 60s;\n"
              f"            {pages}\n"
              f"            error_page 502 504 = @feedback_down;\n"
              f"            proxy_pass http://unix:{settings.run_dir / FEEDBACK_SOCKET};")
    too_large = _answer(413, "TooManyLabels", "A feedback body is at most 1 MiB: send the labels in smaller lists.")
    fallback = (f"        location @feedback_down {{ default_type application/json; add_header X-Request-ID $req_id always; "
                f"add_header Retry-After 2 always; {down} }}\n"
                f"        location @feedback_too_large {{ default_type application/json; add_header X-Request-ID $req_id always; "
                f"{too_large} }}")
    if api == "management":  # the management key, checked by the server: the summary and the labelled set for retraining
        return f"""        location ~ ^/feedback/[A-Za-z0-9._-]+/(summary|export|compare)$ {{
            if ($request_method != GET) {{ return 405; }}
            {common}
        }}
{fallback}"""
    return f"""        # Labels for answers: the feedback key (key_file.json's "feedback"), checked before the body is read.
        location ~ ^/feedback/[A-Za-z0-9._-]+(/summary|/review)?$ {{
            limit_req zone=feedback_auth_failures burst={settings.auth_failure_burst} nodelay;
            auth_request /_auth/feedback;
            client_max_body_size 1m;
            error_page 413 = @feedback_too_large;
            {common}
        }}
        location = /_auth/feedback {{
            internal;
            if ($feedback_ok = 0) {{ return 401; }}
            return 204;
        }}
{fallback}"""


def hop_socket(run_dir: Path, index: int, api: str = "inference") -> Path:
    """Replica ``index``'s hop socket for ``api`` (inference, management, metrics): the gateway's only way to it."""
    return run_dir / (f"replica-{index}.sock" if api == "inference" else f"replica-{index}.{api}.sock")


def _replica_blocks(settings: GatewaySettings) -> tuple[str, str, str]:
    """The gateway's side of the replicas: its upstream list, management routes and metrics routes (hop sockets only)."""
    run = settings.run_dir
    servers, mgmt, metrics = [], [], []
    # One replica is listed twice so that a retry (a dead worker) goes back to it: its other workers answer.
    # No passive failure marking (max_fails=0): whether a replica is in rotation is its hop's to say (a 503 at
    # once, retried on another replica), so a replica is back in rotation the moment its hop says so. With
    # nginx's marking, the idle connections a hop's reload closes count as failures and kept a replica that
    # had just come back out of rotation for another fail_timeout.
    copies = 2 if len(settings.replicas) == 1 else 1
    for i in settings.replicas:
        servers += [f"        server unix:{hop_socket(run, i)} max_fails=0;"] * copies
        refuse = "if ($scale_refused) { return 400 '" + _json_text_obj(settings) + "'; }"
        # The path is rewritten (nginx escapes it again, so an encoded "?" stays in the path) and proxied
        # without a URI part; synchronous scaling may take minutes, hence the longer read timeout.
        to_hop = (f"proxy_pass http://unix:{hop_socket(run, i, 'management')};\n"
                  f"            proxy_read_timeout {MANAGEMENT_TIMEOUT_S}s;")
        route = f"""
        location ~ ^/replicas/{i}/models(/.*)?$ {{
            {refuse}
            rewrite ^/replicas/{i}(/models.*)$ $1 break;
            {to_hop}
        }}"""
        if i == 0:
            route += f"""
        # Unprefixed management calls address replica 0 (with one replica: the whole service).
        location ~ ^/models(/.*)?$ {{
            {refuse}
            {to_hop}
        }}"""
        mgmt.append(route)
        metrics.append(f"        location = /replicas/{i}/metrics "
                       f"{{ proxy_pass http://unix:{hop_socket(run, i, 'metrics')}:/metrics; }}")
    return "\n".join(servers), "\n".join(mgmt), "\n".join(metrics)


def _split_http(hop: HopSettings) -> str:
    """The hop's http-level part of a rollout: the canary's split, or the shadow sink's upstream."""
    split = hop.split
    if split is None:
        return "    # no rollout in progress"
    if split.mode == "canary":
        return (f"    # canary: {split.percent:g} % of {split.model}'s default predictions go to {split.candidate}\n"
                f'    split_clients "${{request_id}}" $rollout_uri {{\n'
                f"        {split.percent:g}% /predictions/{split.model}/{split.candidate};\n"
                f"        * /predictions/{split.model};\n    }}")
    sample = "" if split.percent >= 100 else (
        f'\n    split_clients "${{request_id}}" $shadow_skip {{\n        {split.percent:g}% "";\n        * 1;\n    }}')
    return (f"    # shadow: {split.percent:g} % of {split.model}'s default predictions are mirrored to the sink, which "
            f"forwards them to {split.candidate}\n    upstream shadow_sink {{\n        server unix:{hop.run_dir / SHADOW_SOCKET};"
            f"\n        keepalive 16;\n    }}{sample}")


def _split_locations(hop: HopSettings, auth: str) -> str:
    """The hop's route for the model's default predictions while a rollout is in progress ("" when none is).

    Canary: the share picked by split_clients is proxied to the candidate's versioned URL. Shadow: the client's
    answer comes from the default version as always; nginx's ``mirror`` sends a copy to the shadow sink, which answers
    at once (before it forwards anything), so a slow, failing or killed candidate never holds a client's request or
    the gateway's keep-alive connection (a mirror subrequest must end before its connection serves the next request).
    The sink being down or stuck costs at most the short timeouts below, and only while it is so."""
    split = hop.split
    if split is None:
        return ""
    target = "http://torchserve$rollout_uri" if split.mode == "canary" else "http://torchserve"
    mirror = "" if split.mode == "canary" else "\n            mirror /_shadow;\n            mirror_request_body on;"
    text = f"""        location = /predictions/{split.model} {{
            proxy_pass {target};{mirror}
            {auth}
            proxy_intercept_errors on;
            error_page 507 = @worker_died;
            error_page 404 = @not_found;
        }}
"""
    if split.mode == "shadow":
        text += f"""        location = /_shadow {{
            internal;
            if ($http_describe) {{ return 204; }}  # metadata requests (v2 GET /v2/models/<m>) are not predictions
{"            if ($shadow_skip) { return 204; }  # not in the sample" + chr(10) if split.percent < 100 else ""}            proxy_pass http://shadow_sink/shadow/{split.model}/{split.candidate};
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header X-Shadow-Replica {hop.index};
            proxy_connect_timeout {SHADOW_CONNECT_TIMEOUT_MS}ms;
            proxy_send_timeout {SHADOW_READ_TIMEOUT_MS}ms;
            proxy_read_timeout {SHADOW_READ_TIMEOUT_MS}ms;
            proxy_next_upstream off;
        }}
"""
    return text


def render_hop(hop: HopSettings) -> str:
    """Replica ``hop.index``'s hop: its keys and ports when known and serving; 503s that say why otherwise."""
    r, i = hop.route, hop.index
    # A location's own proxy_set_header drops the http level's, so Connection "" (keep-alive to TorchServe) is repeated.
    auth = lambda key: f'proxy_set_header Connection ""; proxy_set_header Authorization "Bearer {key}";'  # noqa: E731
    if r is None:
        upstreams = "    # no route yet: the replica has not written its keys"
        closed = _answer(503, "ReplicaRestarting", f"Replica {i} is restarting; retry in a few seconds.")
        management = metrics = f"        location / {{ {closed} }}"
    else:
        upstreams = (f"    upstream torchserve {{\n        server {_hostport(r.inference)};\n        keepalive 32;\n    }}")
        management = f"        location / {{ proxy_pass http://{_hostport(r.management)}; {auth(r.management_key)} }}"
        metrics = f"        location = /metrics {{ proxy_pass http://{_hostport(r.metrics)}/metrics; }}"
    # Answers of the hop's own, in the v2 shape for Open Inference Protocol requests (the gateway marks them).
    def both(code: int, kind: str, message: str, v2_message: str | None = None) -> str:
        return (f"if ($http_x_inference_protocol = v2) {{ {_v2_answer(code, v2_message or message)} }} "
                f"{_answer(code, kind, message)}")

    if r is not None and hop.serving:
        # TorchServe answers an unknown model or version 404 (the handler never does).
        not_found = ("Nothing is served at $uri: no such model, or no such version of it. The models and versions "
                     "served: GET /models on the management port (management key), GET /v2/models/<model> (v2).")
        inference = f"""{_split_locations(hop, auth(r.inference_key))}        location / {{
            proxy_pass http://torchserve;
            {auth(r.inference_key)}
            proxy_intercept_errors on;
            error_page 507 = @worker_died;
            error_page 404 = @not_found;
        }}
        location @worker_died {{
            {both(502, "WorkerDied", "The worker died with this request in its batch; the gateway retries it.")}
        }}
        location @not_found {{
            {both(404, "ModelNotFound", not_found, "No such model, or no such version of it, is served here "
                  "(asked for $uri). GET /v2/models/<model> (or gRPC ModelMetadata) lists a model's versions.")}
        }}"""
    else:
        why = hop.why or ("restarting" if r is None else "out of rotation")
        inference = "        location / { " + both(
            503, "ReplicaNotReady", f"Replica {i} is {why}; the gateway sends predictions to the other replicas.") + " }"
    return _fill(HOP_TEMPLATE, {
        "user_line": _user_line(),
        "nofile": str(open_files_limit()),
        "connections": str(max(1024, open_files_limit() - 512)),
        "run": str(hop.run_dir),
        "index": str(i),
        "read_timeout": f"{hop.read_timeout_s}s",
        "management_timeout": f"{MANAGEMENT_TIMEOUT_S}s",
        "upstreams": upstreams,
        "split": _split_http(hop) if r is not None and hop.serving else "    # no rollout in progress",
        "inference": inference,
        "management": management,
        "metrics": metrics,
    })


def _user_line() -> str:
    return "user root root;" if os.geteuid() == 0 else "# (runs as the invoking user)"


def _fill(template: Path, values: dict[str, str]) -> str:
    text = template.read_text()
    missing = sorted(set(re.findall(r"@\{(\w+)\}", text)) - set(values))
    if missing:
        raise KeyError(f"{template}: no value for {missing}")
    return re.sub(r"@\{(\w+)\}", lambda m: values[m.group(1)], text)


def _json_text_obj(settings: GatewaySettings) -> str:
    body = {"code": 400, "type": "WorkerLimit", "message": settings.capacity.refusal_message()}
    return json.dumps(body).replace("'", "\\'").replace("$", "")


def render(settings: GatewaySettings, keys: dict) -> str:
    servers, mgmt, metrics = _replica_blocks(settings)
    return _fill(TEMPLATE, {
        "user_line": _user_line(),
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
        "photo_bodies": str(settings.photo_bodies),
        "allowed_counts": _allowed_counts(settings.capacity.cap),
        "read_timeout": f"{settings.read_timeout_s}s",
        "tries": str(settings.tries),
        "retry_window": f"{settings.retry_window_s}s",
        "replica_servers": servers,
        "management_routes": mgmt,
        "metrics_routes": metrics,
        "error_locations": _error_locations(settings),
        "v2_error_locations": _v2_error_locations(settings),
        "v2_error_pages": _v2_error_pages(settings),
        "grpc_server": _grpc_server(settings),
        "feedback_map": _feedback_map(keys),
        "feedback_routes": _feedback_routes(settings, keys, "feedback"),
        "feedback_management_routes": _feedback_routes(settings, keys, "management"),
        "public_grpc_note": settings.public_grpc or "(not served)",
    })


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


class Nginx:
    """One nginx master serving a config rendered into the run folder; the gateway and each hop are one."""

    name = "nginx"

    def __init__(self, run_dir: Path, conf_name: str, pid_name: str):
        self.run_dir = run_dir
        self.conf = run_dir / conf_name
        self.pid_file = run_dir / pid_name
        self.error_log = run_dir / "error.log"

    def render(self) -> str:
        raise NotImplementedError

    def temp_dir(self) -> Path:
        return self.run_dir / "tmp"

    def sockets(self) -> list[Path]:
        """The Unix sockets it listens on (a master killed outright leaves them behind, and nginx cannot bind them again)."""
        return []

    def write(self) -> bool:
        """Render and check the config; install it when nginx accepts it. True when it differs from the running one."""
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.temp_dir() / sub).mkdir(parents=True, exist_ok=True)
        text = self.render()
        if self.conf.exists() and self.conf.read_text() == text:
            return False
        candidate = self.conf.with_name(self.conf.name + ".new")  # the running config is replaced only by a valid one
        write_private(candidate, text)
        check = subprocess.run([nginx_binary(), "-t", "-q", "-c", str(candidate), "-p", str(self.run_dir),
                                "-e", str(self.error_log)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused the rendered config {candidate}:\n{check.stderr.strip()}")
        os.replace(candidate, self.conf)
        return True

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start(self) -> int:
        self.end_orphans()
        for sock in self.sockets():  # left by a master that was killed: no one listens on them
            sock.unlink(missing_ok=True)
        subprocess.run([nginx_binary(), "-c", str(self.conf), "-p", str(self.run_dir), "-e", str(self.error_log)],
                       check=True, capture_output=True)
        for _ in range(100):
            pid = self.pid()
            if pid:
                return pid
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start; see {self.error_log}")

    def end_orphans(self) -> list[int]:
        """End the workers a master killed outright left behind (they go on serving its old sockets and ports).

        nginx's master is a session leader (it daemonises with setsid), so its workers, orphaned or not,
        are the nginx processes whose session is the dead master's pid, still in the pid file.
        """
        if self.pid() is not None:
            return []
        try:
            master = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return []
        ended = []
        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] == "nginx" and proc.pid != master and os.getsid(proc.pid) == master:
                    proc.kill()
                    ended.append(proc.pid)
            except (OSError, psutil.Error):
                continue
        return ended

    def workers(self) -> set[int]:
        pid = self.pid()
        try:
            return {w.pid for w in psutil.Process(pid).children()} if pid else set()
        except psutil.Error:
            return set()

    def reload(self) -> set[int]:
        """SIGHUP: new workers with the new configuration; the old ones finish their requests, then exit.
        Returns the old workers' pids."""
        before = self.workers()
        pid = self.pid()
        if pid:
            os.kill(pid, signal.SIGHUP)
        return before

    def wait_reloaded(self, old_workers: set[int], timeout: float = 30.0) -> bool:
        """Until none of ``old_workers`` is left and a new one runs: anything sent from now on meets the new config."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.workers()
            if now and not now & old_workers:
                return True
            time.sleep(0.05)
        return False

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


class Gateway(Nginx):
    """The public gateway: rendered once from its settings and the service credentials."""

    name = "the gateway (nginx)"

    def __init__(self, settings: GatewaySettings, keys: dict):
        super().__init__(settings.run_dir, "nginx.conf", "nginx.pid")
        self.settings, self.keys = settings, keys

    def render(self) -> str:
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        return render(self.settings, self.keys)


class Hop(Nginx):
    """Replica ``settings.index``'s hop; ``settings`` is replaced when the replica restarts or its readiness changes."""

    def __init__(self, settings: HopSettings):
        super().__init__(settings.run_dir, f"hop-{settings.index}.conf", f"hop-{settings.index}.pid")
        self.settings = settings
        self.name = f"replica {settings.index}'s hop (nginx)"

    def render(self) -> str:
        return render_hop(self.settings)

    def temp_dir(self) -> Path:
        return self.run_dir / "tmp" / f"hop-{self.settings.index}"

    def sockets(self) -> list[Path]:
        return [hop_socket(self.run_dir, self.settings.index, api) for api in ("inference", "management", "metrics")]
