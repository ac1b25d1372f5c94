"""prepare: killed at random moments and rerun, damaged state files, and slices (SLURM array tasks).

Each case must end with the same shards (sha256) and the same manifest, apart from the timings in
``writer``, as one uninterrupted process.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from data_pipelines.fake_distribution import make_distribution
from data_pipelines.manifest import read_manifest
from data_pipelines.tario import sha256_file

ARGS = ["--source", "imagenet", "--allow-partial", "--resolution", "48", "--samples-per-shard", "5",
        "--quiet", "--min-size", "50"]


def cmd(src, out, *extra, workers="1"):
    return [sys.executable, "-m", "data_pipelines.prepare", str(src), str(out), *ARGS, "--workers", workers, *extra]


def run(src, out, *extra, **kw):
    return subprocess.run(cmd(src, out, *extra, **kw), cwd=ROOT, capture_output=True, text=True, timeout=300)


def comparable(folder):
    m = read_manifest(folder)
    m.pop("writer")
    shards = {s["name"]: sha256_file(Path(folder) / s["name"]) for s in m["shards"]}
    assert all(shards[s["name"]] == s["sha256"] for s in m["shards"])
    return m, shards


@pytest.fixture(scope="module")
def source_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    make_distribution(root, classes=(0, 7, 151, 293, 999), per_class=40, val_per_class=1, parquet=False)
    ref = root.parent / (root.name + "-ref")
    res = run(root / "ILSVRC2012_img_train.tar", ref)
    assert res.returncode == 0, res.stderr
    m, shards = comparable(ref)
    assert m["num_samples"] == 160 and m["min_size"]["dropped"] == 40 and len(shards) == 40
    return root / "ILSVRC2012_img_train.tar", comparable(ref)


def _state_files(out, pattern):
    try:
        return list((Path(out) / ".prepare-state").rglob(pattern))
    except FileNotFoundError:  # not made yet, or removed at the end
        return []


def test_sigkill_at_random_moments_then_rerun_gives_the_same_result(source_and_reference, tmp_path):
    src, ref = source_and_reference
    out = tmp_path / "out"
    rng = random.Random(2026)
    moments = ["start-up", "any", "converting", "converting", "writing shards"]
    landed = []
    for moment in moments:
        proc = subprocess.Popen(cmd(src, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        if moment == "start-up":
            time.sleep(rng.uniform(0.1, 1.0))
        elif moment == "any":
            time.sleep(rng.uniform(0.3, 2.0))
        else:
            pattern = "block-*.json" if moment == "converting" else "shard-*.json"
            before = len(_state_files(out, pattern))
            deadline = time.time() + 60
            while proc.poll() is None and time.time() < deadline and len(_state_files(out, pattern)) <= before:
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, 0.003))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            landed.append(moment)
        proc.wait()
        if (out / "manifest.json").exists():
            break
    assert {"converting", "writing shards"} <= set(landed), landed  # kills landed in both phases
    assert not (out / "manifest.json").exists()
    res = run(src, out)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr or "already written" in res.stderr
    assert comparable(out) == ref


def test_damaged_or_half_written_files_are_redone(source_and_reference, tmp_path):
    src, ref = source_and_reference
    out = tmp_path / "out"
    assert run(src, out, "--slice", "0/2").returncode == 0  # half the blocks converted, nothing assembled
    blocks = sorted(_state_files(out, "block-*.bin"))
    assert len(blocks) == 20 and not list(out.glob("shard-*.tar")) and not (out / "manifest.json").exists()
    # a flipped byte (bit rot), a block cut short, and a half-written temporary file left behind
    data = bytearray(blocks[1].read_bytes())
    data[100] ^= 0xFF
    blocks[1].write_bytes(bytes(data))
    blocks[2].write_bytes(blocks[2].read_bytes()[:50])
    (blocks[3].parent / (blocks[3].name + ".partial")).write_bytes(b"half")
    res = run(src, out)
    assert res.returncode == 0, res.stderr
    assert "resuming, 18 of 40 blocks already converted and verified" in res.stderr
    assert comparable(out) == ref


def test_slices_then_assembly_equal_one_process(source_and_reference, tmp_path):
    src, ref = source_and_reference
    out = tmp_path / "out"
    procs = [subprocess.Popen(cmd(src, out, "--slice", f"{k}/3"), cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for k in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert "slice 2 of 3: blocks 26..39 converted" in errs[2]
    res = run(src, out, workers="2")  # the merge step: assembles from the slices' blocks
    assert res.returncode == 0, res.stderr
    assert "resuming, 40 of 40 blocks" in res.stderr
    assert comparable(out) == ref
    assert not (out / ".prepare-state").exists()
    bad = run(src, tmp_path / "x", "--slice", "3/3")
    assert bad.returncode == 2 and "argument --slice: '3/3': needs 0 <= K < N" in bad.stderr.strip().splitlines()[-1]
