"""The SLURM cluster that the launcher tests submit to.

The cluster is tests/slurm/cluster.sh's two-node cluster on this host. CI starts it
before the tests (`bash tests/slurm/cluster.sh start`). When it is not running and
we are root, the `slurm_cluster` fixture starts it (and stops it after the session);
only where it cannot start are the tests that need it skipped, with the reason.
"""

from __future__ import annotations

import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER_SH = os.path.join(HERE, "cluster.sh")


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
