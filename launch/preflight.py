"""Checks launch/slurm.py makes before anything is queued: what the cluster has, what the trainer needs.

- :func:`require_slurm`: the SLURM client commands are on PATH (else one line naming the missing ones).
- :func:`check_allocation`: the request fits at least one node of the partition (CPUs per node =
  tasks per node x CPUs per task, GPUs, memory) and the partition (node count, time limit), read
  with ``sinfo``; a request no node can satisfy pends forever with reason ``PartitionConfig`` or
  similar, so it is refused here naming the resource.
- :func:`check_world`: everything the trainer checks about the process count (global batch sizes
  divisible by the world size) for ``nodes x tasks per node`` processes.
- :data:`FATAL_REASONS`: pending reasons that cannot clear by waiting; ``--wait`` cancels the job
  and fails on them, and reports other reasons periodically.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from trainer.errors import BadInput

SLURM_COMMANDS = ("sbatch", "squeue", "sacct", "sinfo", "scancel")
# squeue %r reasons that waiting cannot fix (slurm/src/common/slurm_protocol_defs.c job_reason_string).
FATAL_REASONS = {
    "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
    "InvalidQOS", "QOSJobLimit", "PartitionDown", "PartitionInactive", "ReqNodeNotAvail, UnavailableNodes:",
    "AccountNotAllowed", "QOSNotAllowed", "InactiveLimit", "NodeDown", "DependencyNeverSatisfied",
}


class PreflightError(BadInput, ValueError):
    """A request the cluster cannot run, or a SLURM installation that is missing."""


def require_slurm(commands=SLURM_COMMANDS) -> None:
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        raise PreflightError(f"SLURM's {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH: "
                             f"this machine is no SLURM submit host (install slurm-client and point it at your "
                             f"cluster, or use --dry-run to see what would be submitted)")


@dataclass
class Node:
    name: str
    cpus: int
    memory_mb: int
    gpus: int


@dataclass
class Partition:
    name: str
    nodes: List[Node] = field(default_factory=list)
    max_time_min: Optional[int] = None     # None: unlimited
    max_nodes: Optional[int] = None


def _run(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except subprocess.CalledProcessError as exc:
        raise PreflightError(f"`{' '.join(cmd)}` failed: {(exc.stderr or exc.stdout).strip()[:300]}") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise PreflightError(f"`{' '.join(cmd)}` could not run: {exc}") from None


def _gpus(gres: str) -> int:
    total = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            total += int(m.group(1))
    return total


def _minutes(limit: str) -> Optional[int]:
    if not limit or limit.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit)
    if not m:
        return None
    d, a, b, c = (int(g) if g else 0 for g in m.groups())
    if m.group(4) is not None:            # [D-]HH:MM:SS
        return d * 1440 + a * 60 + b + (1 if c else 0)
    if m.group(3) is not None:            # MM:SS or D-HH:MM
        return d * 1440 + a * 60 + b if m.group(1) else a + (1 if b else 0)
    return d * 1440 + a * 60 if m.group(1) else a


def read_partition(name: Optional[str]) -> Partition:
    """The partition (the cluster's default when ``name`` is None) and its nodes, from sinfo."""
    rows = [line.split("|") for line in _run(["sinfo", "-h", "-o", "%P|%l|%D"]).splitlines() if line.strip()]
    if not rows:
        raise PreflightError("sinfo lists no partitions; is the SLURM controller reachable?")
    parts = {r[0].rstrip("*"): r for r in rows}
    if name is None:
        default = [r[0].rstrip("*") for r in rows if r[0].endswith("*")]
        if not default:
            raise PreflightError(f"the cluster has no default partition; pass --partition (one of {', '.join(parts)})")
        name = default[0]
    if name not in parts:
        raise PreflightError(f"--partition {name!r} does not exist; partitions: {', '.join(parts)}")
    part = Partition(name, max_time_min=_minutes(parts[name][1]))
    seen = set()
    for line in _run(["sinfo", "-h", "-N", "-p", name, "-o", "%N|%c|%m|%G"]).splitlines():
        fields = line.split("|")
        if len(fields) < 4 or fields[0] in seen:
            continue
        seen.add(fields[0])
        try:
            part.nodes.append(Node(fields[0], int(fields[1]), int(re.sub(r"\D", "", fields[2]) or 0), _gpus(fields[3])))
        except ValueError:
            continue
    return part


def _mem_mb(text: Optional[str]) -> Optional[int]:
    if not text or text == "0":
        return None
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not m:
        raise PreflightError(f"--mem {text!r}: use a size like 64G or 512M")
    factor = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2)]
    return int(int(m.group(1)) * factor)


def check_allocation(part: Partition, nodes: int, tasks_per_node: int, cpus_per_task: int, gpus_per_node: int,
                     mem: Optional[str], time_min: int) -> None:
    """Refuse what no node (or the partition) can give, naming the resource and what exists."""
    if not part.nodes:
        raise PreflightError(f"partition {part.name!r} has no nodes")
    cpus = tasks_per_node * cpus_per_task
    mem_mb = _mem_mb(mem)
    fits = [n for n in part.nodes if n.cpus >= cpus and n.gpus >= gpus_per_node
            and (mem_mb is None or n.memory_mb >= mem_mb)]
    if not fits:
        best_cpu = max(n.cpus for n in part.nodes)
        best_gpu = max(n.gpus for n in part.nodes)
        best_mem = max(n.memory_mb for n in part.nodes)
        if cpus > best_cpu:
            raise PreflightError(f"each node would need {cpus} CPUs ({tasks_per_node} task(s) x --cpus-per-task "
                                 f"{cpus_per_task}), but the nodes of partition {part.name!r} have at most {best_cpu}; "
                                 f"lower --cpus-per-task")
        if gpus_per_node > best_gpu:
            raise PreflightError(f"--gpus-per-node {gpus_per_node}: the nodes of partition {part.name!r} have at most "
                                 f"{best_gpu} GPU(s)" + ("; use --gpus-per-node 0 for CPU nodes" if best_gpu == 0 else ""))
        if mem_mb is not None and mem_mb > best_mem:
            raise PreflightError(f"--mem {mem}: the nodes of partition {part.name!r} have at most {best_mem} MB")
        raise PreflightError(f"no node of partition {part.name!r} has {cpus} CPUs, {gpus_per_node} GPU(s) and "
                             f"{mem or 'any'} memory at once")
    if nodes > len(fits):
        raise PreflightError(f"--nodes {nodes}: partition {part.name!r} has only {len(fits)} node(s) that fit "
                             f"{tasks_per_node} task(s) x {cpus_per_task} CPU(s)" +
                             (f", {gpus_per_node} GPU(s)" if gpus_per_node else ""))
    if part.max_time_min is not None and time_min > part.max_time_min:
        raise PreflightError(f"--time {time_min} min exceeds partition {part.name!r}'s limit of {part.max_time_min} min")


def check_world(config: Dict, world: int) -> None:
    """The trainer's own divisibility checks, for ``world`` processes, before anything is queued."""
    train = config.get("train", {}) or {}
    batch = int(train.get("batch_size", 0) or 0)
    g_batch = int(train.get("g_batch_size", 0) or 0) or batch
    for key, value in (("train.batch_size", batch), ("train.g_batch_size", g_batch)):
        if value and value % world:
            raise PreflightError(f"{key}={value} is not divisible by the {world} process(es) this allocation starts "
                                 f"(nodes x tasks per node); choose a multiple of {world} or another process count")


def pending_reason(job_id: str) -> Optional[str]:
    """squeue's reason for a pending job (None once it runs or leaves the queue)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    state, _, reason = out.splitlines()[0].partition("|")
    return reason.strip() if state.strip() == "PENDING" else None


def is_fatal(reason: Optional[str]) -> bool:
    return bool(reason) and any(reason == r or reason.startswith(r) for r in FATAL_REASONS)
