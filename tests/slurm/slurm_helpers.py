"""Helpers for the SLURM tests: the local cluster, driving launch/slurm.py as a user would, reading a run.

The cluster is tests/slurm/cluster.sh's two-node cluster on this host. CI starts it
before the tests (`bash tests/slurm/cluster.sh start`). When it is not running and
we are root, the `slurm_cluster` fixture starts it (and stops it after the session);
only where it cannot start are the tests that need it skipped, with the reason.

(A fixture module, not tests/slurm/conftest.py: a second module named `conftest`
would shadow tests/conftest.py, which other test modules import by that name.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CLUSTER_SH = os.path.join(HERE, "cluster.sh")

# The `default` experiment shrunk to a fraction of a second per step on 2 CPU cores.
TINY = ["model.g_ch=8", "model.d_ch=8", "model.z_dim=16", "train.batch_size=8", "train.n_dis=1",
        "train.log_every=1", "train.sample_every=1000", "train.progress=false"]
# Two nodes, one CPU task each: gloo, as on a cluster without GPUs.
CPU_ALLOC = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10"]


def _cluster(cmd: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", CLUSTER_SH, cmd], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Skips (with the reason) unless the local SLURM cluster is up or can be started."""
    if _cluster("status", 60).returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("local SLURM cluster not running, and starting it (tests/slurm/cluster.sh start) needs root")
    try:
        started = _cluster("start", 900)
    except subprocess.TimeoutExpired:
        pytest.skip("tests/slurm/cluster.sh start did not finish within 900 s")
    if started.returncode != 0:
        why = (started.stderr.strip().splitlines() or [f"exit status {started.returncode}"])[-1]
        pytest.skip(f"local SLURM cluster cannot start: {why}")
    yield
    _cluster("stop", 120)


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
