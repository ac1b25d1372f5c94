"""`launch/slurm.py prepare`: a SLURM array of prepare slices plus a merge job, on the real 2-node cluster.

The shards and manifest must equal those of one `python -m data_pipelines.prepare` process on the
same source (apart from the timings in the manifest's `writer`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_helpers import slurm_cluster  # noqa: F401  (the fixture, used through pytestmark)
from slurm_helpers import REPO, jobs, launcher, report

from data_pipelines.fake_distribution import make_distribution
from data_pipelines.manifest import read_manifest
from data_pipelines.tario import sha256_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

PREPARE = ["--source", "imagenet", "--allow-partial", "--resolution", "32", "--samples-per-shard", "5",
           "--min-size", "50"]


def comparable(folder: Path):
    m = read_manifest(folder)
    m.pop("writer")
    return m, {s["name"]: sha256_file(folder / s["name"]) for s in m["shards"]}


def test_prepare_array_equals_one_process(tmp_path):
    src = tmp_path / "dist"
    make_distribution(src, classes=(0, 7, 151, 293, 999), per_class=12, val_per_class=1, parquet=False)
    ref = tmp_path / "ref"
    one = subprocess.run([sys.executable, "-m", "data_pipelines.prepare", str(src), str(ref), *PREPARE,
                          "--workers", "1", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr

    out = tmp_path / "out"
    t0 = time.time()
    res = launcher("prepare", str(src), str(out), "--tasks", "3", "--cpus-per-task", "1", "--time", "10",
                   "--wait", "--", *PREPARE, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    report("prepare array (3 slices + merge, 60 images) sbatch -> manifest", time.time() - t0)
    entries = jobs(out)
    assert len(entries) == 4 and all(e["kind"] == "prepare" for e in entries)
    array_id = entries[0]["job_id"].split("_")[0]
    assert [e["job_id"] for e in entries[:3]] == [f"{array_id}_{k}" for k in range(3)]
    assert "array of 3" in res.stdout and f"after job {array_id} succeeds" in res.stdout
    for k, e in enumerate(entries[:3]):
        log = Path(e["stderr"]).read_text()
        assert f"slice {k} of 3" in log, log[-2000:]
    merge_log = Path(entries[3]["stderr"]).read_text()
    assert "resuming, 12 of 12 blocks already converted and verified" in merge_log, merge_log[-2000:]

    got, want = comparable(out), comparable(ref)
    assert got == want
    assert got[0]["num_samples"] == 48 and got[0]["min_size"]["dropped"] == 12


def test_prepare_array_refuses_bad_options_before_submitting(tmp_path):
    res = launcher("prepare", str(tmp_path), str(tmp_path / "o"), "--", "--source", "imagenet", "--slice", "0/2")
    assert res.returncode == 2 and "--slice is set by the launcher" in res.stderr
    res = launcher("prepare", str(tmp_path), str(tmp_path / "o"), "--", "--source", "imagenet", "--resolution", "x")
    assert res.returncode == 2 and "'x' is not a size in pixels" in res.stderr and res.stderr.count("\n") == 1
    res = launcher("prepare", str(tmp_path / "nope"), str(tmp_path / "o"), "--", "--source", "imagenet")
    assert res.returncode == 2 and "nope" in res.stderr and "does not exist" in res.stderr
    assert not (tmp_path / "o").exists()
