"""Helpers for the SLURM tests: drive launch/slurm.py as a user would, read what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The `default` experiment shrunk to a fraction of a second per step on 2 CPU cores.
TINY = ["model.g_ch=8", "model.d_ch=8", "model.z_dim=16", "train.batch_size=8", "train.n_dis=1",
        "train.log_every=1", "train.sample_every=1000", "train.progress=false"]
# Two nodes, one CPU task each: gloo, as on a cluster without GPUs.
CPU_ALLOC = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10"]


def launcher(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python launch/slurm.py ARGS` as a user would, from the repository root."""
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", "slurm.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def launcher_bg(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "slurm.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def jobs(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "slurm", "jobs.jsonl")
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def metrics(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.endswith("\n")]


def wait_until(predicate, timeout: float, what: str, poll: float = 0.1):
    """Polls predicate() until it returns something truthy; returns (value, time.time() when seen)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value, time.time()
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def task_log(run_dir, job_id: str, task: int, stream: str = "err") -> str:
    path = os.path.join(run_dir, "slurm", job_id, f"{job_id}_{task}_log.{stream}")
    with open(path, errors="replace") as fh:
        return fh.read()


def report(name: str, seconds: float) -> None:
    """A measured figure, printed so that `pytest -s` / CI logs show it."""
    print(f"\n[measured] {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
