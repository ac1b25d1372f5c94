"""What runs inside a SLURM job that launch/slurm.py submitted.

submitit pickles one of these callables and runs it once per task (one task
per GPU, or one per node with --gpus-per-node 0). Each task:

1. maps SLURM's variables to torch.distributed's (launch/cluster_env.py), so
   the trainer's `accelerate.Accelerator` joins one process group;
2. calls the trainer's (or the evaluator's) `main(argv)` in this process;
3. on the trainer's EXIT_PREEMPTED (a checkpoint was written after SIGUSR2 or
   SIGTERM), rank 0 requeues the job with `scontrol requeue`, and every rank
   waits for SLURM to end the allocation. The requeued job runs the same
   command with the same --out, and the trainer resumes (train.resume=auto).
   SLURM_RESTART_COUNT bounds the requeues.

Why not submitit's own checkpoint/requeue: submitit installs its SIGUSR2
handler before calling us, but the trainer installs its own (flag only, so the
checkpoint is written at a step boundary with all ranks agreeing), which
replaces submitit's. submitit's handler is only live while Python and torch
import; `checkpoint()` below makes it requeue in that window too.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from launch.cluster_env import torch_dist_env
from trainer.errors import EXIT_PREEMPTED  # the standard library only: the submitting side never imports torch

# How long a task waits for SLURM to end the allocation after the requeue request.
REQUEUE_WAIT_S = 300


class TaskFailed(RuntimeError):
    """The trainer or evaluator ended with a non-zero status (the job then ends FAILED)."""


class RequeueLimitReached(TaskFailed):
    """Preempted again after --max-requeues requeues: stop instead of looping forever."""


def log(msg: str) -> None:
    rank = os.environ.get("SLURM_PROCID", "?")
    print(f"[slurm rank {rank}] {msg}", file=sys.stderr, flush=True)


def node_address(host: str) -> str:
    """`host` when it resolves; else its NodeAddr from slurm.conf.

    Node names need not be DNS names (several slurmd on one host, or clusters
    that only know nodes by address); SLURM itself reaches them at NodeAddr.
    """
    try:
        socket.getaddrinfo(host, None)
        return host
    except socket.gaierror:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"master node {host!r} does not resolve and `scontrol show node` failed: {exc}") from exc
    m = re.search(r"\bNodeAddr=(\S+)", out)
    if not m:
        raise RuntimeError(f"master node {host!r} does not resolve and has no NodeAddr in: {out.strip()!r}")
    return m.group(1)


def setup_distributed_env(gpus_per_node: int) -> dict[str, str]:
    """Exports the torch.distributed variables for this task; returns them."""
    dist_env = torch_dist_env(os.environ)
    dist_env["MASTER_ADDR"] = node_address(dist_env["MASTER_ADDR"])
    os.environ.update(dist_env)
    if gpus_per_node == 0:
        # CPU run on purpose: hide any GPU so the trainer picks the gloo backend.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # accelerate otherwise sizes torch's thread pool from the whole machine's cores.
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        os.environ.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
    log("torch.distributed env: " + " ".join(f"{k}={v}" for k, v in dist_env.items()))
    return dist_env


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def run_main(module: str, argv: list[str]) -> int:
    """`module.main(argv)` in this process; None counts as success."""
    rc = importlib.import_module(module).main(argv)
    return 0 if rc is None else int(rc)


@dataclass
class TrainTask:
    """One training task: `trainer.main.main(argv)` with the SLURM->torch env set."""

    argv: list[str]
    gpus_per_node: int
    max_requeues: int = 10
    module: str = "trainer.main"

    def __call__(self) -> int:
        setup_distributed_env(self.gpus_per_node)
        log(f"{self.module} {' '.join(self.argv)} (requeued {restart_count()} times so far, at most {self.max_requeues})")
        rc = run_main(self.module, self.argv)
        if rc == 0:
            return 0
        if rc == EXIT_PREEMPTED:
            self._requeue_and_wait()
        raise TaskFailed(f"{self.module} exited with status {rc}; see this task's log above")

    def _requeue_and_wait(self) -> None:
        done = restart_count()
        if done >= self.max_requeues:
            raise RequeueLimitReached(
                f"checkpoint written, but the job was already requeued {done} times (--max-requeues "
                f"{self.max_requeues}): not requeuing again; submit the same command to continue")
        # SLURM ends the allocation with SIGTERM (then SIGKILL): that is the expected end now.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(EXIT_PREEMPTED))
        job_id = os.environ["SLURM_JOB_ID"]
        if os.environ.get("SLURM_PROCID", "0") == "0":
            log(f"checkpoint written; requeueing job {job_id} (requeue {done + 1} of at most {self.max_requeues})")
            requeue = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
            if requeue.returncode != 0:
                # E.g. SLURM preempted with PreemptMode=REQUEUE and is requeueing the job already.
                log(f"scontrol requeue {job_id} failed ({requeue.stderr.strip()}); waiting for SLURM to end the job")
        time.sleep(REQUEUE_WAIT_S)  # ended by SLURM's SIGTERM (handler above) long before this
        raise TaskFailed(f"requeue of job {job_id} requested, but SLURM did not end the job within {REQUEUE_WAIT_S}s")

    def checkpoint(self, *args, **kwargs):
        """submitit's SIGUSR2 handler calls this if the signal comes before the trainer's handler exists."""
        import submitit

        if restart_count() >= self.max_requeues:
            return None  # submitit then ends the job instead of requeueing
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@dataclass
class EvalTask:
    """One evaluation task: `<module>.main(argv)` (eval.main or eval.batch) with the same env set-up."""

    module: str
    argv: list[str] = field(default_factory=list)
    gpus_per_node: int = 1

    def __call__(self) -> int:
        setup_distributed_env(self.gpus_per_node)
        log(f"{self.module} {' '.join(self.argv)}")
        rc = run_main(self.module, self.argv)
        if rc != 0:
            raise TaskFailed(f"{self.module} exited with status {rc}; see this task's log above")
        return 0
