"""How many cores this process may use (no torch import: the serving stack's capacity rule uses it too)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_count() -> int:
    """Cores this process may use: its affinity, capped by a cgroup CPU quota (a container's CPU limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores
