"""How many workers this machine can hold: the cap the gateway and ``ctl scale`` enforce.

TorchServe 0.12 starts any worker count it is asked for: 1,000 workers of ~570 MB
took a 24 GiB machine down. The cap is derived, not guessed:

    memory cap = (usable memory - replicas x frontend - gateway reserve) / (replicas x worker)
    core cap   = WORKERS_PER_CORE x cores / replicas
    cap        = max(1, min(memory cap, core cap))      (workers per replica)

``worker`` is the largest worker's resident size measured on the running replicas;
``frontend`` the larger of a frontend's resident size and the bound its vmargs set
(heap + direct memory + JVM overhead: it grows that far under large uploads); ``usable memory`` is USABLE_SHARE of the machine's memory,
or of the container's cgroup limit when it is lower. Past WORKERS_PER_CORE workers a
core, extra workers only add memory and context switches (each runs at least one
intra-op thread).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from handler.cores import cpu_count

USABLE_SHARE = 0.75  # of the machine's memory; the rest is for the OS, page cache and bursts
GATEWAY_RESERVE_MB = 256.0
WORKERS_PER_CORE = 4
WORKER_MARKER = "model_service_worker"
JVM_OVERHEAD_MB = 256.0  # metaspace, code cache, thread stacks, GC structures beyond heap and direct memory  # in a TorchServe Python worker's command line


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
                f"(a worker takes {self.worker_mb:.0f} MB, measured; a frontend up to {self.frontend_mb:.0f} MB; "
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
    """Cores the service may use: affinity, capped by a cgroup CPU quota (the handler's own rule)."""
    return cpu_count()


_SIZE = re.compile(r"^(\d+)([kmgt]?)$", re.IGNORECASE)


def _mib(text: str) -> float:
    number, unit = _SIZE.match(text).groups()
    return int(number) * {"": 2**-20, "k": 2**-10, "m": 1, "g": 2**10, "t": 2**20}[unit.lower()]


def frontend_bound_mb(vmargs: str) -> float | None:
    """The most a TorchServe frontend may take: heap + direct memory + JVM_OVERHEAD_MB, from its vmargs.

    The frontend is small at rest (about 190 MB here) and grows with concurrent large bodies up to
    about heap + direct memory (docs/hardening-torchserve.md measured 1.7 GB with -Xmx1g and 512m).
    """
    heap = re.search(r"-Xmx(\S+)", vmargs)
    direct = re.search(r"-XX:MaxDirectMemorySize=(\S+)", vmargs)
    if not heap:
        return None
    try:
        return _mib(heap.group(1)) + (_mib(direct.group(1)) if direct else _mib(heap.group(1))) + JVM_OVERHEAD_MB
    except (AttributeError, KeyError):
        return None


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


def measure(frontend_pids: list[int], vmargs: str = "") -> Capacity:
    """Capacity from the running replicas: workers' resident size now; frontends' bound from ``vmargs``.

    A frontend is counted at the larger of its size now and what its vmargs let it grow to.
    """
    workers = [rss_mb(w) for pid in frontend_pids for w in workers_of(pid)]
    frontends = [rss_mb(psutil.Process(pid)) for pid in frontend_pids if psutil.pid_exists(pid)]
    if not workers or not frontends:
        raise RuntimeError(f"no running worker to measure under frontends {frontend_pids}")
    frontend = max(max(frontends), frontend_bound_mb(vmargs) or 0.0)
    return Capacity(worker_mb=round(max(workers), 1), frontend_mb=round(frontend, 1),
                    memory_mb=round(machine_memory_mb(), 1), cores=machine_cores(), replicas=len(frontend_pids))


def read(path: Path) -> Capacity | None:
    """The capacity a running gateway published (its replicas.json), if there is one."""
    try:
        return Capacity.from_json(json.loads(path.read_text())["capacity"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
