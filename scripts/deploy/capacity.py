"""How many workers this machine can hold: the cap the gateway and ``ctl scale`` enforce.

TorchServe 0.12 starts any worker count it is asked for: 1,000 workers of ~570 MB
took a 24 GiB machine down. The cap is derived, not guessed:

    memory cap = (usable memory - replicas x frontend - gateway reserve) / (replicas x worker)
    core cap   = WORKERS_PER_CORE x cores / replicas
    cap        = max(1, min(memory cap, core cap))      (workers per replica)

``worker`` and ``frontend`` are resident sizes measured on the running replicas
(the largest worker seen); ``usable memory`` is USABLE_SHARE of the machine's memory,
or of the container's cgroup limit when it is lower. Past WORKERS_PER_CORE workers a
core, extra workers only add memory and context switches (each runs at least one
intra-op thread).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

USABLE_SHARE = 0.75  # of the machine's memory; the rest is for the OS, page cache and bursts
GATEWAY_RESERVE_MB = 256.0
WORKERS_PER_CORE = 4
WORKER_MARKER = "model_service_worker"  # in a TorchServe Python worker's command line


@dataclass(frozen=True)
class Capacity:
    worker_mb: float
    frontend_mb: float
    memory_mb: float
    cores: int
    replicas: int

    @property
    def memory_cap(self) -> int:
        usable = self.memory_mb * USABLE_SHARE - self.replicas * self.frontend_mb - GATEWAY_RESERVE_MB
        return math.floor(usable / (self.replicas * self.worker_mb))

    @property
    def core_cap(self) -> int:
        return math.floor(WORKERS_PER_CORE * self.cores / self.replicas)

    @property
    def cap(self) -> int:
        return max(1, min(self.memory_cap, self.core_cap))

    def refusal_message(self) -> str:
        return (f"min_worker and max_worker must be 1 to {self.cap} per replica on this machine "
                f"(a worker takes {self.worker_mb:.0f} MB, measured; frontend {self.frontend_mb:.0f} MB; "
                f"memory {self.memory_mb / 1024:.1f} GiB, {USABLE_SHARE:.0%} usable; {self.cores} cores, "
                f"at most {WORKERS_PER_CORE} workers a core; {self.replicas} replica(s)). "
                "0 workers stops serving: add force=true to mean it. See docs/deploy.md, 'Worker cap'.")

    def check(self, workers: int, force: bool = False) -> str | None:
        """None when ``workers`` is allowed, else why not (the same rule as the gateway's)."""
        if workers == 0 and force:
            return None
        if not 1 <= workers <= self.cap:
            return self.refusal_message()
        return None

    def to_json(self) -> dict:
        return {**asdict(self), "cap": self.cap, "memory_cap": self.memory_cap, "core_cap": self.core_cap,
                "usable_share": USABLE_SHARE, "gateway_reserve_mb": GATEWAY_RESERVE_MB,
                "workers_per_core": WORKERS_PER_CORE}

    @classmethod
    def from_json(cls, data: dict) -> Capacity:
        return cls(**{k: data[k] for k in ("worker_mb", "frontend_mb", "memory_mb", "cores", "replicas")})


def machine_memory_mb() -> float:
    """The machine's memory, or the cgroup's limit (a container) when that is lower."""
    total = psutil.virtual_memory().total
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total / 2**20


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def workers_of(frontend_pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(frontend_pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            if any(WORKER_MARKER in part for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def rss_mb(proc: psutil.Process) -> float:
    try:
        return proc.memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def measure(frontend_pids: list[int]) -> Capacity:
    """Capacity from the running replicas' frontends and workers (their current resident sizes)."""
    workers = [rss_mb(w) for pid in frontend_pids for w in workers_of(pid)]
    frontends = [rss_mb(psutil.Process(pid)) for pid in frontend_pids if psutil.pid_exists(pid)]
    if not workers or not frontends:
        raise RuntimeError(f"no running worker to measure under frontends {frontend_pids}")
    return Capacity(worker_mb=round(max(workers), 1), frontend_mb=round(max(frontends), 1),
                    memory_mb=round(machine_memory_mb(), 1), cores=machine_cores(), replicas=len(frontend_pids))


def read(path: Path) -> Capacity | None:
    """The capacity a running gateway published (its replicas.json), if there is one."""
    try:
        return Capacity.from_json(json.loads(path.read_text())["capacity"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
