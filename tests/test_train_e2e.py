"""End-to-end training through the real entry points (subprocesses, CPU, tiny models)."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow
MAIN = os.path.join(ROOT, "trainer", "main.py")


def run(out, *overrides, check=True, timeout=300):
    proc = subprocess.run([sys.executable, MAIN, "--out", str(out), *TINY, *overrides],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_ckpt(path):
    """G, D (full state dicts incl. SN buffers) and G_ema of a checkpoint, via the trainer's loaders."""
    from trainer.build import build_parts
    from trainer.checkpoint import load_modules
    from trainer.config import load_config
    cfg = load_config("default", TINY + ["train.ema_half_life_kimg=2"])
    parts = build_parts(cfg, torch.device("cpu"))
    load_modules(path, {"G": parts.G, "D": parts.D, "G_ema": parts.G_ema})
    return {f"{m}.{k}": v.clone() for m, mod in (("G", parts.G), ("D", parts.D), ("G_ema", parts.G_ema))
            for k, v in mod.state_dict().items()}


def test_run_writes_samples_tensorboard_checkpoints(tmp_path):
    run(tmp_path, "train.steps=4", "train.ckpt_every=2")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["ckpt-000000002", "ckpt-000000004"]
    meta = json.loads((tmp_path / "checkpoints" / "ckpt-000000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["images_seen"] == 4 * (8 + 8)
    assert "generator.safetensors" in meta["files"]
    assert glob.glob(str(tmp_path / "samples" / "step-000000004.png"))
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    last = records[-1]
    for key in ("loss/d", "loss/g", "D/real", "D/fake", "grad_norm/D", "grad_norm/G", "lr/D", "perf/images_per_s"):
        assert key in last and last[key] == last[key]  # present and not NaN
    sigmas = [k for k in last if k.startswith("sigma/")]
    assert len(sigmas) >= 5 and all(last[k] > 0 for k in sigmas)
    assert "steps: 4" in (tmp_path / "config.yaml").read_text()
    # The exported generator samples without trainer code.
    from models.export import load_generator
    G, info = load_generator(str(tmp_path / "checkpoints" / "ckpt-000000004" / "generator.safetensors"))
    assert info["which"] == "G_ema" and info["info"]["step"] == 4
    x = G(torch.randn(3, G.z_dim), torch.tensor([0, 4, 9]))
    assert x.shape == (3, 3, 32, 32) and x.abs().max() <= 1


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    args = ("train.steps=8", "train.ckpt_every=4", "train.ema_half_life_kimg=2", "loss.name=hinge")
    run(tmp_path / "a", *args)
    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, MAIN, "--out", str(b), *TINY, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 240
    while not (b / "checkpoints" / "ckpt-000000004" / "meta.json").exists():
        assert proc.poll() is None, "run b ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (b / "checkpoints" / "ckpt-000000008").exists(), "killed too late to test a resume"
    resumed = run(b, *args)
    assert "resumed from" in resumed.stdout and "ckpt-000000004" in resumed.stdout
    sa = load_ckpt(str(tmp_path / "a" / "checkpoints" / "ckpt-000000008"))
    sb = load_ckpt(str(b / "checkpoints" / "ckpt-000000008"))
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"not bitwise equal after resume: {different[:5]}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_through_accelerate_stay_in_sync(tmp_path):
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           os.path.join(ROOT, "tests", "ddp_probe.py"), str(tmp_path), *TINY, "train.steps=4",
           "train.ckpt_every=2", "train.batch_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0 = torch.load(tmp_path / "probe-rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "probe-rank1.pt", weights_only=True)
    assert r0["world"] == 2 and r1["world"] == 2
    for net in ("G", "D"):
        for key, value in r0[net].items():
            if "running_" in key or "num_batches" in key:
                continue  # G's BN statistics are per-rank between DDP broadcasts (see trainer/loop.py)
            assert torch.equal(value, r1[net][key]), f"{net}.{key} differs across ranks"
    u_keys = [k for k in r0["D"] if k.endswith("._u")]
    assert len(u_keys) >= 5
    # The ranks trained on different data: every real batch differs.
    assert len(r0["seen"]) == len(r1["seen"]) == 4
    assert all(a != b for a, b in zip(r0["seen"], r1["seen"]))
    # Both ranks wrote their part of the sharded checkpoint.
    assert sorted(os.listdir(tmp_path / "checkpoints" / "ckpt-000000004" / "state")) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_resume_at_another_world_size(tmp_path):
    """A checkpoint written by 2 processes resumes in 1 process."""
    test_two_processes_through_accelerate_stay_in_sync(tmp_path)
    before = load_ckpt(str(tmp_path / "checkpoints" / "ckpt-000000004"))
    proc = run(tmp_path, "train.steps=5", "train.ckpt_every=2")
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    assert "world size changed from 2 to 1" in proc.stdout and "reseeded" in proc.stdout
    after = load_ckpt(str(tmp_path / "checkpoints" / "ckpt-000000005"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("D."))


def test_sigterm_writes_checkpoint_and_exits_75(tmp_path):
    proc = subprocess.Popen([sys.executable, MAIN, "--out", str(tmp_path), *TINY, "train.steps=100000",
                             "train.ckpt_every=100000", "train.log_every=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "SIGTERM" in err
    ckpts = os.listdir(tmp_path / "checkpoints")
    assert len(ckpts) == 1 and ckpts[0].startswith("ckpt-")
    step = int(ckpts[0].split("-")[1])
    assert step >= 1
    resumed = run(tmp_path, f"train.steps={step + 1}", "train.ckpt_every=100000", "train.log_every=1")
    assert f"at step {step}" in resumed.stdout


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    run(tmp_path, "train.steps=2", "train.ckpt_every=2", "model.d_constraint=gp")
    # A penalty weight that overflows float32: the D loss is inf at the first step after the resume.
    proc = run(tmp_path, "train.steps=6", "train.ckpt_every=2", "model.d_constraint=gp",
               "loss.gp_weight=1e300", "--allow-config-change", check=False)
    assert proc.returncode == 1
    assert "non-finite loss" in proc.stderr and "at step 3" in proc.stderr
    assert "ckpt-000000002" in proc.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["ckpt-000000002"]


def test_corrupt_checkpoint_is_named_and_skipped(tmp_path):
    run(tmp_path, "train.steps=4", "train.ckpt_every=2")
    shard = tmp_path / "checkpoints" / "ckpt-000000004" / "state" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncate
    (tmp_path / "checkpoints" / "ckpt-000000009.partial").mkdir()        # an interrupted save
    # An explicitly requested broken checkpoint is an error naming the file, not garbage weights.
    bad = run(tmp_path / "other", "train.steps=5", f"train.resume={tmp_path}/checkpoints/ckpt-000000004",
              check=False)
    assert bad.returncode == 2 and "__0_0.distcp" in bad.stderr
    # resume=auto names the broken one and falls back to the previous checkpoint.
    proc = run(tmp_path, "train.steps=5", "train.ckpt_every=2")
    assert "ckpt-000000004" in proc.stderr and "__0_0.distcp" in proc.stderr and "truncated" in proc.stderr
    assert "resumed from" in proc.stdout and "ckpt-000000002" in proc.stdout
