"""The trainer runs a few steps from WebDataset shards and from an FFCV file (real entry point)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY
from data_pipelines import fakedata
from data_pipelines.sources import open_source
from data_pipelines.tario import index_path
from data_pipelines.writer import PrepareOptions, prepare

pytestmark = pytest.mark.slow
MAIN = os.path.join(ROOT, "trainer", "main.py")


def train(out, *overrides, expect=0):
    if not os.path.isfile(MAIN):
        pytest.fail("trainer/main.py is missing")
    proc = subprocess.run([sys.executable, MAIN, "--exp", "default", "--out", str(out), *TINY, *overrides],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == expect, f"trainer exited {proc.returncode}, expected {expect}:\n{proc.stdout}\n{proc.stderr}"
    if expect:
        return None, proc
    assert proc.returncode == 0, f"trainer failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    fakedata.make_cifar10(root / "raw", per_batch=8, batches=5, test=2)
    return open_source("cifar10", str(root / "raw"), "train"), root


def test_trainer_runs_from_webdataset_shards_and_logs_skips(cifar):
    source, root = cifar
    shards = root / "wds"
    prepare(source, shards, PrepareOptions(samples_per_shard=8, progress=False))
    for shard in sorted(shards.glob("*.tar"))[:2]:  # 16 of 40 images undecodable
        idx = np.load(index_path(shard))
        raw = bytearray(shard.read_bytes())
        for offset, size in idx[:, :2].tolist():
            raw[offset:offset + size] = b"\0" * size
        shard.write_bytes(bytes(raw))
    args = ("data.backend=webdataset", f"data.path={shards}", "data.resolution=32", "data.num_workers=1",
            "train.steps=3")
    # By default the shards are checked against the manifest first: refused, nothing written.
    _, refused = train(root / "run-refused", *args, expect=2)
    assert "shard-000000.tar" in refused.stderr and "shard-000001.tar" in refused.stderr
    assert "data.verify=off" in refused.stderr and "Traceback" not in refused.stderr
    assert not (root / "run-refused" / "config.yaml").exists()
    # data.verify=off: train anyway; the damaged samples are skipped and counted.
    records, proc = train(root / "run-wds", *args, "data.verify=off")
    assert records[-1]["step"] == 3
    assert records[-1]["data/skipped"] > 0  # counted in the loader worker, logged by the trainer
    assert "skipping sample" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("ffcv") is None,
                    reason="ffcv is not installed (optional extra; CI installs it with tests/install_ffcv.sh)")
def test_trainer_runs_from_ffcv(cifar):
    source, root = cifar
    prepare(source, root / "ffcv", PrepareOptions(format="ffcv", samples_per_shard=8, workers=1, progress=False))
    records, _ = train(root / "run-ffcv", "data.backend=ffcv", f"data.path={root / 'ffcv'}", "data.resolution=32",
                       "data.num_workers=1", "train.steps=3")
    assert records[-1]["step"] == 3 and records[-1]["data/skipped"] == 0
