"""Hand this host's pip configuration to `podman build`, so pip inside the build finds the
same indexes, wheels, constraints and CA bundle as pip here.

    python3 deploy/container/pip_config.py OUT_DIR      # prints podman build arguments, one a line

pip's configuration is read the way pip reads it (``pip config list``: every config file plus
the ``PIP_*`` environment variables, the latter winning) and written as one ``OUT_DIR/pip.conf``.
Values that name something on this disk are made reachable inside the build:

- a local file (``cert``, ``constraint``, a requirements file) is copied into OUT_DIR and the
  value rewritten to its path under the mount point /run/host-pip;
- a local folder (``find-links``, ``file://`` indexes) is mounted read-only at /run/host-pip/dirN
  and the value rewritten to it; for an index ending in ``/simple`` its parent is mounted,
  because its pages link to ``../../files``.

The build mounts OUT_DIR at /run/host-pip (read-only) and sets PIP_CONFIG_FILE there; mounts
are not committed to image layers (only the empty /run/host-pip mount point is). The
arguments printed are ``-v`` options, one a line.
"""

from __future__ import annotations

import ast
import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

MOUNT_POINT = "/run/host-pip"


def pip_config() -> dict[str, dict[str, str]]:
    """{section: {key: value}} as pip sees it; environment variables (``:env:``) override files."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    files: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        section, _, name = key.rpartition(".")
        value = ast.literal_eval(raw)
        if section == ":env:":
            env[name] = value
        else:
            files.setdefault(section, {})[name] = value
    files.setdefault("global", {}).update(env)
    return files


def localise(config: dict[str, dict[str, str]], out_dir: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    mounts: list[str] = []
    copied = 0
    result: dict[str, dict[str, str]] = {}
    for section, items in config.items():
        for name, value in items.items():
            tokens = []
            for token in value.split():
                url = token.startswith("file://")
                path = Path(token[len("file://"):] if url else token)
                if not path.is_absolute() or not path.exists():
                    tokens.append(token)
                    continue
                if path.is_file():
                    copied += 1
                    target = out_dir / f"{copied}-{path.name}"
                    shutil.copyfile(path, target)
                    inside = f"{MOUNT_POINT}/{target.name}"
                    tokens.append(f"file://{inside}" if url else inside)
                else:
                    root = path.parent if path.name == "simple" else path
                    if str(root) not in mounts:
                        mounts.append(str(root))
                    inside = f"{MOUNT_POINT}/dir{mounts.index(str(root)) + 1}"
                    (out_dir / Path(inside).name).mkdir(exist_ok=True)  # the mount point, in the read-only mount
                    moved = inside + str(path)[len(str(root)):]
                    tokens.append(f"file://{moved}" if url else moved)
            result.setdefault(section, {})[name] = " ".join(tokens)
    return result, mounts


def main(out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    config, mounts = localise(pip_config(), out_dir)
    parser = configparser.ConfigParser(interpolation=None)
    for section, items in config.items():
        parser[section] = items
    with open(out_dir / "pip.conf", "w") as f:
        parser.write(f)
    os.chmod(out_dir, 0o755)
    args = [f"-v={out_dir.resolve()}:{MOUNT_POINT}:ro"] + [f"-v={m}:{MOUNT_POINT}/dir{i}:ro" for i, m in enumerate(mounts, 1)]
    print("\n".join(args))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
