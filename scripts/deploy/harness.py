"""Run a real TorchServe (Java frontend + Python workers) for the integration tests.

The server is started from the shipped ``config.properties`` with only what must
differ for a test run rewritten: free loopback ports, an absolute model store
and metrics config, and a private working directory and TMPDIR (TorchServe keeps
its pid file and worker sockets in TMPDIR, so a test server never touches a
server started by ``make serve``). Token authorization stays as shipped: on.
It is stopped with ``torchserve --stop`` under the same TMPDIR. The gRPC ports
and the JVM's java.io.tmpdir (where worker sockets live) are private too, so
several test servers can run side by side.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from scripts.ops.tsclient import TorchServeClient, read_properties, wait_ready

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "ankle_boot.png"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# An archive name in the model store: no "/", no "%" (Java decodes %2f and %2e%2e in file: URLs
# when it opens them, so "[^/]+" lets "%2e%2e%2f" walk out of the store), no "..".
ARCHIVE_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.mar"


def allowed_urls_for(model_store: Path) -> str:
    """TorchServe's ``allowed_urls`` for archives in ``model_store`` only (a Java regex, not yet .properties-escaped).

    TorchServe full-matches each comma-separated pattern against the URL, case-insensitively:
    ``(?-i)`` turns that off (otherwise ``file:///TMP/X/MODEL_STORE/a.mar`` matches the store
    ``/tmp/x/model_store``, a different folder on Linux), and ``\\Q...\\E`` quotes the path.
    """
    store = str(Path(model_store).resolve())
    if "," in store or "\\E" in store:
        raise ValueError(f"model store path {store!r} cannot be written into allowed_urls (',' or '\\E')")
    return rf"(?-i)file://\Q{store}\E/{ARCHIVE_NAME}"


def _properties_value(value: str) -> str:
    """A value as java.util.Properties reads it back: backslashes doubled."""
    return value.replace("\\", "\\\\")


def absolute_log_config(vmargs: str) -> str:
    """vmargs with a relative -Dlog4j.configurationFile made absolute (against the repository)."""
    flag = "-Dlog4j.configurationFile="
    words = []
    for word in vmargs.split():
        if word.startswith(flag) and not Path(word[len(flag):]).is_absolute() and ":" not in word[len(flag):]:
            word = flag + str(REPO / word[len(flag):])
        words.append(word)
    return " ".join(words)


def write_config(workdir: Path, model_store: Path, overrides: dict[str, str] | None = None) -> Path:
    """The shipped config.properties with ports, paths (and ``overrides``) rewritten."""
    inf, mgmt, met, grpc_inf, grpc_mgmt = free_ports(5)
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    shipped = read_properties(REPO / "config.properties")
    replace = {
        "inference_address": f"http://127.0.0.1:{inf}",
        "management_address": f"http://127.0.0.1:{mgmt}",
        "metrics_address": f"http://127.0.0.1:{met}",
        "grpc_inference_port": str(grpc_inf),
        "grpc_management_port": str(grpc_mgmt),
        "model_store": str(model_store),
        # file: URLs only for archives in this very store (TorchServe has no switch for POST /workflows:
        # this, and workflow_store, are what keep it from loading an archive from anywhere else).
        "allowed_urls": _properties_value(allowed_urls_for(model_store)),
        "metrics_config": str(REPO / "metrics.yaml"),
        # The frontend puts worker sockets (.ts.sock.<port>) in java.io.tmpdir: keep them private.
        "vmargs": f"{absolute_log_config(shipped.get('vmargs', ''))} -Djava.io.tmpdir={tmp}".strip(),
        **(overrides or {}),
    }
    lines, seen = [], set()
    for line in (REPO / "config.properties").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in replace:
            line, _ = f"{key}={replace[key]}", seen.add(key)
        lines.append(line)
    lines += [f"{k}={v}" for k, v in replace.items() if k not in seen]
    path = workdir / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Server:
    workdir: Path
    config: Path
    model_store: Path
    client: TorchServeClient
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. the recording settings of the serving stack

    @property
    def env(self) -> dict:
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
        return {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "PATH": path, **self.extra_env}

    def properties(self) -> dict[str, str]:
        return read_properties(self.config)

    def launch(self, stdout=subprocess.DEVNULL) -> None:
        """``torchserve --start``: returns once the frontend is forked (models load after); its output to ``stdout``."""
        subprocess.run(
            [str(Path(sys.executable).parent / "torchserve"), "--start", "--ts-config", str(self.config), "--ncs"],
            cwd=self.workdir, env=self.env, check=True, stdout=stdout, stderr=subprocess.STDOUT,
        )

    def pid(self) -> int | None:
        """The frontend's pid while it runs (torchserve --start writes it into TMPDIR), else None."""
        try:
            pid = int((self.workdir / "tmp" / ".model_server.pid").read_text())
            return pid if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE else None
        except (OSError, ValueError, psutil.Error):
            return None

    def start(self, model: str = "fashion_cnn", deadline_s: float = 240.0) -> dict:
        self.launch()
        try:
            return wait_ready(self.client, model, EXAMPLE.read_bytes(), deadline_s=deadline_s,
                              alive=lambda: self.pid() is not None)
        except Exception:
            print(self.log_tail("ts_log.log"), self.log_tail(), sep="\n", file=sys.stderr)
            self.stop()
            raise

    def stop(self) -> None:
        subprocess.run(
            [str(Path(sys.executable).parent / "torchserve"), "--stop"],
            cwd=self.workdir, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=120,
        )

    def log_tail(self, name: str = "model_log.log", lines: int = 40) -> str:
        log = self.workdir / "logs" / name
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else f"(no {log})"


def build_store(store: Path, archives: list[dict] | None = None) -> Path:
    """Package archives into ``store`` with scripts.deploy.package; default: the shipped model as fashion_cnn.mar."""
    from scripts.deploy import package

    store.mkdir(parents=True, exist_ok=True)
    for spec in archives or [{}]:
        args = package.get_args_parser().parse_args([])
        args.export_path = store
        for key, value in spec.items():
            setattr(args, key, value)
        package.main(args)
    return store


def make_server(workdir: Path, overrides: dict[str, str] | None = None, archives: list[dict] | None = None) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    store = build_store(workdir / "model_store", archives)
    config = write_config(workdir, store, overrides)
    client = TorchServeClient.from_config(config, workdir)
    return Server(workdir, config, store, client)


V2_ARCHIVE = {"version": "2.0", "archive_name": "fashion_cnn_v2"}


def make_two_version_server(workdir: Path, overrides: dict[str, str] | None = None) -> Server:
    """fashion_cnn 1.0 (the default: listed first) and 2.0 (same model) loaded at start with load_models."""
    return make_server(workdir, overrides={"load_models": "fashion_cnn.mar,fashion_cnn_v2.mar", **(overrides or {})},
                       archives=[{}, V2_ARCHIVE])
