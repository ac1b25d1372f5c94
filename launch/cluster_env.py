"""SLURM's task environment -> the torch.distributed environment.

One pure function, `torch_dist_env`, maps the variables SLURM sets for every
task of a job step (SLURM_PROCID, SLURM_NTASKS, SLURM_JOB_NODELIST, ...) to the
ones `torch.distributed` / `accelerate.Accelerator` read (MASTER_ADDR,
MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE). With those set,
the trainer runs unchanged under `accelerate launch` and under SLURM.

No imports of torch or submitit here, so it is cheap and testable with plain
dicts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from trainer.errors import BadInput

# Master ports are derived from the job id inside [PORT_BASE, PORT_BASE + PORT_SPAN):
# below Linux's ephemeral range (32768-60999), so no outgoing connection on the
# master node can already hold the port, and distinct for concurrent jobs
# whose ids differ by less than PORT_SPAN.
PORT_BASE = 20000
PORT_SPAN = 10000

REQUIRED = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")


class SlurmEnvError(BadInput, ValueError):
    """The environment is not a SLURM task's, or a variable cannot be read."""


def _expand_range(body: str) -> list[str]:
    """'1-3,07,10-11' -> ['1', '2', '3', '07', '10', '11'] (zero padding kept)."""
    out: list[str] = []
    for part in body.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise SlurmEnvError(f"bad range {part!r} in node list")
            out.extend(f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
        elif part.isdigit():
            out.append(part)
        else:
            raise SlurmEnvError(f"bad range item {part!r} in node list")
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expands SLURM's compact host list, in order.

    'n[1-2]' -> ['n1', 'n2'];  'gpu[01-02,10],cpu5' -> ['gpu01', 'gpu02', 'gpu10', 'cpu5'];
    'r[1-2]-n[1-2]' -> ['r1-n1', 'r1-n2', 'r2-n1', 'r2-n2'].
    """
    group_re = r"(?:[^,\[\]]|\[[^\[\]]+\])+"  # a name with bracketed ranges, no top-level comma
    if not re.fullmatch(rf"{group_re}(?:,{group_re})*", nodelist):
        raise SlurmEnvError(f"cannot read node list {nodelist!r}")
    hosts: list[str] = []
    for group in re.findall(group_re, nodelist):
        names = [""]
        for literal, bracket in re.findall(r"([^\[]+)|\[([^\]]*)\]", group):
            suffixes = [literal] if literal else _expand_range(bracket)
            names = [name + s for name in names for s in suffixes]
        hosts.extend(names)
    return hosts


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE '2(x3),1' -> [2, 2, 2, 1] (one count per node)."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise SlurmEnvError(f"cannot read SLURM_TASKS_PER_NODE={spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def master_port(job_id: str | int) -> int:
    """A port that is the same on every task of a job (and its requeues), from the job id."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise SlurmEnvError(f"{name}={env[name]!r} is not an integer") from None


def torch_dist_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for the SLURM task described by `env`.

    MASTER_ADDR is the first host of the allocation (where global rank 0 runs,
    since SLURM places tasks in node order); MASTER_PORT comes from the job id;
    RANK, LOCAL_RANK and WORLD_SIZE are SLURM_PROCID, SLURM_LOCALID and
    SLURM_NTASKS. LOCAL_WORLD_SIZE is this node's task count.
    """
    missing = [k for k in REQUIRED if k not in env]
    if missing:
        raise SlurmEnvError(
            f"not inside a SLURM job step: {', '.join(missing)} unset "
            "(run through `srun`, or through submitit, which uses srun)"
        )
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    rank, local_rank, world = (_int(env, k) for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"))
    if not 0 <= rank < world:
        raise SlurmEnvError(f"SLURM_PROCID={rank} outside [0, SLURM_NTASKS={world})")
    if "SLURM_TASKS_PER_NODE" in env and "SLURM_NODEID" in env:
        per_node = tasks_per_node(env["SLURM_TASKS_PER_NODE"])
        node = _int(env, "SLURM_NODEID")
        if not 0 <= node < len(per_node):
            raise SlurmEnvError(f"SLURM_NODEID={node} but SLURM_TASKS_PER_NODE={env['SLURM_TASKS_PER_NODE']!r}")
        local_world = per_node[node]
    else:
        local_world = world // len(hosts) or 1
    return {
        "MASTER_ADDR": hosts[0],
        "MASTER_PORT": str(master_port(_int(env, "SLURM_JOB_ID"))),
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local_world),
    }
