"""A run folder that nothing can corrupt or hijack (issue 16), through the real entry points.

Each test names the fault of docs/reliability.md it proves: crafted checkpoints, two trainers on
one folder, every stop signal (also through `accelerate launch` with two processes), checkpoints
that do not verify, refused resumes, config changes, a full disk, SIGKILL at random moments.
"""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow
MAIN = os.path.join(ROOT, "trainer", "main.py")
LOCAL = os.path.join(ROOT, "launch", "local.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(out, *args, timeout=300, env=None):
    return subprocess.run([sys.executable, MAIN, "--out", str(out), *TINY, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env or ENV)


def start(out, *args, **kw):
    return subprocess.Popen([sys.executable, MAIN, "--out", str(out), *TINY, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV, **kw)


def wait_for(predicate, proc, timeout=120, what="condition", interval=0.02):
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{out}\n{err}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def metrics_lines(out):
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def ckpts(out):
    folder = out / "checkpoints"
    return sorted(n for n in os.listdir(folder)) if folder.exists() else []


def rewrite_with_checksums(ckpt):
    """Recompute meta.json's sha256 table, as the author of a crafted checkpoint would."""
    from data_pipelines.tario import sha256_file
    meta_path = ckpt / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = {rel: sha256_file(ckpt / rel) for rel in meta["files"]}
    meta_path.write_text(json.dumps(meta))


class Pwn:
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


# ------------------------------------------------------------------------------ a checkpoint is data

def test_crafted_dcp_metadata_is_refused_by_trainer_and_analysis_tools(tmp_path):
    """Fault: state/.metadata replaced by a pickle that runs a command (checksums recomputed)."""
    proc = run(tmp_path / "run", "train.steps=2", "train.ckpt_every=2")
    assert proc.returncode == 0, proc.stderr
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-000000002"
    target = tmp_path / "pwned"
    bomb = Pwn()
    bomb.target = target
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(bomb))
    rewrite_with_checksums(ckpt)
    config_before = (tmp_path / "run" / "config.yaml").read_text()
    proc = run(tmp_path / "run", "train.steps=4", "train.ckpt_every=2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not target.exists(), "the crafted checkpoint ran code"
    assert ".metadata" in proc.stderr and "posix.system" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "config.yaml").read_text() == config_before
    for tool in (["-m", "eval.spectra", str(tmp_path / "run"), "--out", str(tmp_path / "spectra")],
                 ["-m", "eval.neighbors", "--ckpt", str(tmp_path / "run"), "--data", "synthetic:32:64",
                  "--out", str(tmp_path / "nn"), "--num-queries", "2", "--k", "2"]):
        res = subprocess.run([sys.executable, *tool], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
        assert res.returncode == 2, (tool, res.stdout, res.stderr)
        assert not target.exists() and ".metadata" in res.stderr, (tool, res.stderr)


def test_restricted_unpickler_reads_what_dcp_reads(tmp_path):
    """The adapter pins torch's own reader: same metadata from a real checkpoint (torch upgrades)."""
    import torch.distributed.checkpoint as dcp
    from trainer.safe_dcp import SafeFileSystemReader
    proc = run(tmp_path, "train.steps=2", "train.ckpt_every=2", "train.ema_half_life_kimg=1")
    assert proc.returncode == 0, proc.stderr
    state = tmp_path / "checkpoints" / "ckpt-000000002" / "state"
    ours, theirs = SafeFileSystemReader(str(state)).read_metadata(), dcp.FileSystemReader(str(state)).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data
    assert any(k.startswith("state.opt_d") for k in ours.state_dict_metadata)


# ------------------------------------------------------------------------------ one writer per folder

def test_second_trainer_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    """Fault: two trainers started on one --out."""
    first = start(tmp_path, "train.steps=100000", "train.ckpt_every=100000", "train.log_every=1")
    try:
        wait_for(lambda: metrics_lines(tmp_path), first, what="the first trainer's first step")
        second = run(tmp_path, "train.steps=100000")
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"pid {first.pid}" in second.stderr and "in use" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 75
    # The lock went with its holder: the next trainer resumes.
    step = int(ckpts(tmp_path)[-1].split("-")[1])
    proc = run(tmp_path, f"train.steps={step + 1}", "train.ckpt_every=100000", "train.log_every=1")
    assert proc.returncode == 0 and f"at step {step}" in proc.stdout, proc.stderr


def test_stale_lock_content_without_flock_is_taken_over(tmp_path):
    """Where flock is unavailable the file content is the lock; a dead holder on this host is stale."""
    import socket
    from trainer.runfolder import RunFolderBusy, RunLock
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert RunLock.is_stale({"host": socket.gethostname(), "pid": dead.pid})
    assert not RunLock.is_stale({"host": socket.gethostname(), "pid": os.getpid()})
    assert not RunLock.is_stale({"host": "some-other-host", "pid": dead.pid})
    lock = RunLock(str(tmp_path))
    (tmp_path / ".trainer.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    lock._acquire_by_content()  # stale: no error
    (tmp_path / ".trainer.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                       "started": "now"}))
    with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
        lock._acquire_by_content()


# ------------------------------------------------------------------------------ signals

def test_sigterm_is_honoured_when_every_step_checkpoints(tmp_path):
    """Fault: SIGTERM with train.ckpt_every=1 used to train on to the end."""
    proc = start(tmp_path, "train.steps=100000", "train.ckpt_every=1", "train.log_every=1", "train.keep_ckpts=2")
    wait_for(lambda: len(metrics_lines(tmp_path)) >= 2, proc, what="two steps")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    step = int(ckpts(tmp_path)[-1].split("-")[1])
    assert step < 1000 and "stop signal" in out


def test_ctrl_c_checkpoints_and_a_second_one_stops_at_once(tmp_path):
    """Fault: SIGINT gave a KeyboardInterrupt traceback and no checkpoint."""
    proc = start(tmp_path / "a", "train.steps=100000", "train.ckpt_every=100000", "train.log_every=1",
                 "data.num_workers=1")
    wait_for(lambda: metrics_lines(tmp_path / "a"), proc, what="the first step")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "KeyboardInterrupt" not in err and "SIGINT" in err
    assert len(ckpts(tmp_path / "a")) == 1
    # Two Ctrl-C in a row (as a terminal sends them: to the whole process group) stop at once. A
    # wider model makes a step last long enough for the second one to land inside it.
    proc = start(tmp_path / "b", "train.steps=100000", "train.ckpt_every=100000", "train.log_every=1",
                 "model.g_ch=64", "model.d_ch=64", "train.batch_size=64", "train.n_dis=4", start_new_session=True)
    wait_for(lambda: metrics_lines(tmp_path / "b"), proc, what="the first step")
    os.killpg(proc.pid, signal.SIGINT)
    # The second Ctrl-C once the first has been handled (its message is out), inside the same step:
    # two signals sent before the handler runs would merge into one.
    first = ""
    while "received SIGINT" not in first:
        line = proc.stderr.readline()
        assert line, f"stderr closed before the first SIGINT was handled:\n{first}"
        first += line
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = first + err
    assert proc.returncode == -signal.SIGINT, err
    assert "stopping now" in err and not ckpts(tmp_path / "b")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR2", "SIGINT"])
def test_stop_signals_reach_both_ranks_through_accelerate_launch(tmp_path, signame):
    """Fault: under `accelerate launch` with 2 processes SIGTERM exited 1 and SIGUSR2 orphaned the
    workers. Through launch/local.py every rank checkpoints and the run exits 75."""
    from eval_helpers import free_port
    cmd = [sys.executable, LOCAL, "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           MAIN, "--out", str(tmp_path), *TINY, "train.steps=100000", "train.ckpt_every=100000", "train.log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    wait_for(lambda: metrics_lines(tmp_path), proc, timeout=180, what="the first logged step")
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    names = ckpts(tmp_path)
    assert len(names) == 1
    state = tmp_path / "checkpoints" / names[0] / "state"
    assert sorted(os.listdir(state)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout == b"", "orphaned workers"


# ------------------------------------------------------------------------------ no silent restart

def test_no_verifying_checkpoint_is_refused_not_restarted(tmp_path):
    """Fault: every checkpoint damaged -> resume=auto warned twice and restarted at step 0."""
    assert run(tmp_path, "train.steps=4", "train.ckpt_every=2").returncode == 0
    for name in ckpts(tmp_path):
        blob = tmp_path / "checkpoints" / name / "generator.safetensors"
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    before = {n: (tmp_path / "checkpoints" / n / "meta.json").read_text() for n in ckpts(tmp_path)}
    proc = run(tmp_path, "train.steps=6", "train.ckpt_every=2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "ckpt-000000002" in proc.stderr and "ckpt-000000004" in proc.stderr and "train.resume=none" in proc.stderr
    assert {n: (tmp_path / "checkpoints" / n / "meta.json").read_text() for n in ckpts(tmp_path)} == before
    # train.resume=none is the explicit way to start over.
    proc = run(tmp_path, "train.steps=2", "train.ckpt_every=2", "train.resume=none")
    assert proc.returncode == 0 and "resumed" not in proc.stdout, proc.stderr


def test_refused_resumes_leave_config_yaml_and_config_changes_are_recorded(tmp_path):
    """Faults: a refused resume rewrote config.yaml; another loss / n_dis / optimizer resumed silently."""
    assert run(tmp_path, "train.steps=2", "train.ckpt_every=2").returncode == 0
    config = (tmp_path / "config.yaml").read_text()
    proc = run(tmp_path, "train.steps=4", "model.z_dim=17")
    assert proc.returncode == 2 and "model.z_dim: 16 -> 17" in proc.stderr, proc.stderr
    assert (tmp_path / "config.yaml").read_text() == config
    proc = run(tmp_path, "train.steps=4", "train.n_dis=2", "loss.name=wasserstein")
    assert proc.returncode == 2, proc.stderr
    assert "train.n_dis: 1 -> 2" in proc.stderr and "loss.name: 'hinge' -> 'wasserstein'" in proc.stderr
    assert (tmp_path / "config.yaml").read_text() == config
    # Rerun keys change freely; other keys with the explicit flag, recorded in the history.
    proc = run(tmp_path, "train.steps=4", "train.ckpt_every=4", "train.log_every=1")
    assert proc.returncode == 0 and "at step 2" in proc.stdout, proc.stderr
    proc = run(tmp_path, "train.steps=6", "train.ckpt_every=2", "optim.name=rmsprop", "--allow-config-change")
    assert proc.returncode == 0 and "fresh states" in proc.stdout, proc.stderr
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [h["start_step"] for h in history] == [0, 2, 4]
    assert history[-1]["changed"]["optim.name"] == ["adam", "rmsprop"]
    assert "name: rmsprop" in (tmp_path / "config.yaml").read_text()


def test_resume_path_that_is_no_checkpoint_says_so(tmp_path):
    (tmp_path / "notackpt").mkdir()
    proc = run(tmp_path / "run", f"train.resume={tmp_path / 'notackpt'}")
    assert proc.returncode == 2 and "not a checkpoint folder" in proc.stderr, proc.stderr


def test_checkpoint_that_does_not_load_is_a_clean_exit_2(tmp_path):
    """Fault: DCP's CheckpointException is a BaseException and escaped as an exit-1 traceback."""
    assert run(tmp_path, "train.steps=2", "train.ckpt_every=2").returncode == 0
    ckpt = tmp_path / "checkpoints" / "ckpt-000000002"
    shard = ckpt / "state" / "__0_0.distcp"
    shard.write_bytes(b"\0" * shard.stat().st_size)   # same size, garbage; checksums recomputed
    rewrite_with_checksums(ckpt)
    proc = run(tmp_path, "train.steps=4")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "ckpt-000000002" in proc.stderr and "cannot be loaded" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ full disk

def _can_unshare_mount():
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c",
                           "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare_mount(), reason="needs `unshare --mount` and tmpfs (user or root namespaces)")
def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path):
    """Fault: a full disk ended in an enforce-fail traceback or an OSError from the sample PNG."""
    disk = tmp_path / "disk"
    disk.mkdir()
    run_dir = disk / "run"
    args = " ".join([*TINY, "train.sample_every=1000", "train.log_every=1000"])
    filler = (f"{sys.executable} -c \"import os,shutil; f=open('{disk}/fill','wb'); "
              f"free=shutil.disk_usage('{disk}').free; f.write(b'x'*max(0, free-24*1024)); f.close()\"")
    script = f"""set -u
mount -t tmpfs -o size=24m tmpfs {disk}
cd {ROOT}
{sys.executable} {MAIN} --out {run_dir} {args} train.steps=2 train.ckpt_every=2 > {tmp_path}/a.out 2> {tmp_path}/a.err
echo $? > {tmp_path}/a.rc
{filler}
{sys.executable} {MAIN} --out {run_dir} {args} train.steps=4 train.ckpt_every=2 > {tmp_path}/b.out 2> {tmp_path}/b.err
echo $? > {tmp_path}/b.rc
ls {run_dir}/checkpoints > {tmp_path}/after.ls
cp -r {run_dir}/checkpoints/ckpt-000000002 {tmp_path}/kept
"""
    subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], env=ENV, timeout=300, check=True)
    assert (tmp_path / "a.rc").read_text().strip() == "0", (tmp_path / "a.err").read_text()
    err = (tmp_path / "b.err").read_text()
    assert (tmp_path / "b.rc").read_text().strip() == "74", err
    assert "no space left" in err and "ckpt-000000004" in err and "ckpt-000000002 is intact" in err
    assert "Traceback" not in err
    assert (tmp_path / "after.ls").read_text().split() == ["ckpt-000000002"]   # no .partial left
    from trainer.checkpoint import verify
    assert verify(str(tmp_path / "kept"))["step"] == 2


# ------------------------------------------------------------------------------ SIGKILL at any moment

def _load(ckpt):
    from trainer.build import build_parts
    from trainer.checkpoint import load_modules
    from trainer.config import load_config
    cfg = load_config("default", TINY + ["train.ema_half_life_kimg=2"])
    parts = build_parts(cfg, torch.device("cpu"))
    load_modules(str(ckpt), {"G": parts.G, "D": parts.D, "G_ema": parts.G_ema})
    return {f"{m}.{k}": v.clone() for m, mod in (("G", parts.G), ("D", parts.D), ("G_ema", parts.G_ema))
            for k, v in mod.state_dict().items()}


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path):
    """Faults: SIGKILL at start-up, mid-step and mid-checkpoint-write; each time resumed."""
    args = ("train.steps=16", "train.ckpt_every=2", "train.ema_half_life_kimg=2", "train.log_every=1")
    assert run(tmp_path / "ref", *args).returncode == 0
    b = tmp_path / "b"
    rng = random.Random(1234)
    moments = ["start-up", "mid-step", "mid-checkpoint", "mid-step", "mid-checkpoint"]
    caught_partial = 0
    for moment in moments:
        proc = start(b, *args, start_new_session=True)
        if moment == "start-up":
            time.sleep(rng.uniform(0.2, 1.5))          # imports, model build, resume
        elif moment == "mid-step":
            lines = len(metrics_lines(b))
            wait_for(lambda: len(metrics_lines(b)) > lines, proc, what="a new step")
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            def partial_exists():
                folder = b / "checkpoints"
                return folder.exists() and any(n.endswith(".partial") for n in os.listdir(folder))
            wait_for(partial_exists, proc, what="a checkpoint being written", interval=0.0005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        caught_partial += moment == "mid-checkpoint" and any(n.endswith(".partial") for n in ckpts(b))
    assert caught_partial >= 1, "no kill landed inside a checkpoint write"
    final = run(b, *args)
    assert final.returncode == 0, final.stderr
    ref, got = _load(tmp_path / "ref" / "checkpoints" / "ckpt-000000016"), _load(b / "checkpoints" / "ckpt-000000016")
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"not bitwise equal after kills and resumes: {different[:5]}"
