"""The evaluator with 2 processes (gloo, CPU) gives the statistics and metrics of 1 process.

Both launch paths are used: ``torchrun`` for the reference statistics and ``accelerate launch``
for the evaluation, each running the entry point as a script path. N is odd, so the ranks' slices
differ in size. The tiny-test extractor stands in for Inception (same interface).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from eval.extractors import build_extractor
from eval.main import EvalOptions, evaluate
from eval.reference import compute_reference
from eval.data import open_source
from eval.statsfile import load_stats

from eval_helpers import ROOT, free_port, make_checkpoint, subprocess_env

DATA = "synthetic:32:601"
METRICS = "fid,is,kid,intra_fid"
N, PER_CLASS = 251, 25   # not divisible by 2 ranks; intra-FID (250 samples) is a separate pass


def launch(make_cmd, timeout=300):
    """Run a launcher command; once more on a fresh port if the free port was taken meanwhile."""
    for _attempt in range(2):
        proc = subprocess.run(make_cmd(free_port()), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=subprocess_env())
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval1")
    ext = build_extractor("tiny-test")
    ref = compute_reference(open_source(DATA), ext, str(tmp / "ref1.npz"), per_class=True, keep_features=True,
                            batch_size=64, workers=0, spec=DATA)
    ckpt = make_checkpoint(tmp / "run", 10)
    opts = EvalOptions(tuple(METRICS.split(",")), N, PER_CLASS, batch_size=32, kid_subsets=5, kid_subset_size=100)
    return tmp, ref, ckpt, evaluate(ckpt, ref, ext, opts)


@pytest.mark.slow
def test_two_processes_give_the_statistics_of_one(one_process):
    tmp, ref1, ckpt, result1 = one_process
    ref2 = str(tmp / "ref2.npz")
    launch(lambda port: ["torchrun", "--nproc_per_node", "2", "--master_port", str(port),
                         os.path.join(ROOT, "eval", "reference.py"), "--data", DATA, "--out", ref2,
                         "--extractor", "tiny-test", "--per-class", "--keep-features", "--batch-size", "64",
                         "--workers", "0"])
    a, b = load_stats(ref1), load_stats(ref2)
    assert a.n == b.n == 601 and b.info["world_size"] == 2 and a.info["world_size"] == 1
    np.testing.assert_allclose(b.mu, a.mu, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.sigma, a.sigma, rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(b.features(), a.features())  # gathered in global order
    for c in (0, 9):
        for x, y in zip(a.class_stats(c), b.class_stats(c)):
            np.testing.assert_allclose(y, x, rtol=1e-10, atol=1e-13)

    out = str(tmp / "result2.json")
    proc = launch(lambda port: [
                   "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                   os.path.join(ROOT, "eval", "main.py"), "--ckpt", ckpt, "--ref", ref1, "--extractor", "tiny-test",
                   "--metrics", METRICS, "--num-samples", str(N), "--per-class", str(PER_CLASS),
                   "--batch-size", "32", "--kid-subsets", "5", "--kid-subset-size", "100", "--out", out])
    assert proc.stdout.count('"fid"') == 1  # only rank 0 reports
    with open(out) as fh:
        result2 = json.load(fh)
    assert result2["world_size"] == 2 and result1["world_size"] == 1
    for key in ("fid", "is", "is_std", "kid", "kid_std", "intra_fid"):
        assert result2[key] == pytest.approx(result1[key], rel=1e-6), key
    np.testing.assert_allclose(result2["intra_fid_classes"], result1["intra_fid_classes"], rtol=1e-6)
    assert result1["step"] == 10 and result1["images_seen"] == 640 and result1["which"] == "G_ema"
    assert result1["fid"] > 0 and result1["intra_fid"] > result1["fid"] * 0.5


def test_metrics_have_sensible_values(one_process):
    _, ref, ckpt, result = one_process
    assert 1.0 <= result["is"] < 10.0 and np.isfinite(result["kid"])
    assert len(result["intra_fid_classes"]) == 10
    assert result["intra_fid"] == pytest.approx(np.mean(result["intra_fid_classes"]))


@pytest.mark.slow
def test_script_paths_have_help():
    for script in ("main.py", "batch.py"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval", script), "--help"],
                              capture_output=True, text=True, timeout=120, cwd="/", env=subprocess_env())
        assert proc.returncode == 0 and "(default:" in proc.stdout, script + proc.stderr
