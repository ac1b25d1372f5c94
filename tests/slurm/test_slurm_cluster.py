"""End-to-end through launch/slurm.py and submitit on the real local SLURM cluster (2 nodes).

Each test uses its own run folder, so its own submitit folder (job ids restart on a fresh
cluster). The measured overheads are printed with `[measured]` (visible with -s).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from slurm_helpers import slurm_cluster  # noqa: F401  (the fixture, used through pytestmark)
from slurm_helpers import CPU_ALLOC, REPO, TINY, jobs, launcher, launcher_bg, metrics, report, task_log, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]


def _probe_env():
    """Runs inside each SLURM task: the torch.distributed env the launcher would set."""
    import os

    from launch.slurm_task import setup_distributed_env

    env = setup_distributed_env(gpus_per_node=0)
    return {**env, "CUDA_VISIBLE_DEVICES": os.environ["CUDA_VISIBLE_DEVICES"], "node": os.environ["SLURMD_NODENAME"]}


def test_submitit_job_gets_the_torch_env_on_two_nodes(tmp_path):
    import submitit

    executor = submitit.SlurmExecutor(folder=tmp_path / "%j")
    # The job unpickles _probe_env by reference: this module and launch/ must be importable there.
    executor.update_parameters(nodes=2, ntasks_per_node=1, cpus_per_task=1, time=5,
                               setup=[f"export PYTHONPATH={REPO}:{os.path.dirname(os.path.abspath(__file__))}"])
    job = executor.submit(_probe_env)
    per_task = job.results()
    port = str(20000 + int(job.job_id) % 10000)
    assert [t["RANK"] for t in per_task] == ["0", "1"]
    assert [t["node"] for t in per_task] == ["n1", "n2"]
    for t in per_task:
        # n1 is not a DNS name here: its NodeAddr from slurm.conf is used.
        assert (t["MASTER_ADDR"], t["MASTER_PORT"], t["WORLD_SIZE"], t["LOCAL_RANK"]) == ("127.0.0.1", port, "2", "0")
        assert t["CUDA_VISIBLE_DEVICES"] == ""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 6-step run of 2 nodes x 1 CPU task through the launcher, with checkpoints at steps 3 and 6."""
    run = tmp_path_factory.mktemp("slurm") / "run"
    proc = launcher_bg(*CPU_ALLOC, "--exp", "default", "--out", str(run), "--wait",
                       "train.steps=6", "train.ckpt_every=3", *TINY)
    _, first_step_at = wait_until(lambda: metrics(run), 240, "the first metrics line")
    out, err = proc.communicate(timeout=300)
    return run, proc.returncode, out + err, first_step_at


def test_train_two_nodes_cpu_gloo(trained_run):
    run, rc, output, first_step_at = trained_run
    assert rc == 0, output
    job = jobs(run)[0]
    report("sbatch -> first training step (2 nodes x 1 CPU task)", first_step_at - job["submitted_unix"])

    assert f"submitted job {job['job_id']}" in output and str(run) in output and job["stdout"] in output
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt-000000003", "ckpt-000000006"]
    for task in (0, 1):
        log = task_log(run, job["job_id"], task)
        assert f"RANK={task} LOCAL_RANK=0 WORLD_SIZE=2" in log
    assert "2 process(es) on cpu" in task_log(run, job["job_id"], 0, "out")

    status = launcher("status", str(run))
    assert status.returncode == 0, status.stderr
    assert "COMPLETED" in status.stdout and "ckpt-000000006 (step 6)" in status.stdout
    assert "step=6" in status.stdout and "loss/d=" in status.stdout


# The evaluator with its small stand-in feature extractor, so that a CPU evaluates in seconds.
EVAL_ARGS = ["--extractor", "tiny-test", "--metrics", "fid", "--num-samples", "64", "--batch-size", "32"]


def test_eval_batch_then_array_over_checkpoints(trained_run, tmp_path, monkeypatch):
    run, rc, _, _ = trained_run
    assert rc == 0
    monkeypatch.setenv("SNGAN_CACHE_DIR", str(tmp_path / "cache"))  # reference statistics land here
    batch = launcher("eval", str(run), *CPU_ALLOC, "--wait", "--", *EVAL_ARGS, "--ref-num-images", "128")
    assert batch.returncode == 0, batch.stdout + batch.stderr
    with open(run / "eval.jsonl") as fh:
        records = [json.loads(line) for line in fh]
    assert [r["checkpoint"] for r in records] == ["ckpt-000000003", "ckpt-000000006"]
    assert all(r["fid"] > 0 and r["world_size"] == 2 for r in records)  # both nodes evaluated together
    status = launcher("status", str(run)).stdout
    assert "latest evaluation: ckpt-000000006  fid=" in status

    array = launcher("eval", str(run), "--array", *CPU_ALLOC, "--nodes", "1", "--wait",
                     "--", *EVAL_ARGS, "--ref", records[0]["ref"])
    assert array.returncode == 0, array.stdout + array.stderr
    assert "(array of 2)" in array.stdout
    array_jobs = [j for j in jobs(run) if j["kind"] == "eval"][1:]
    assert [j["argv"][2] for j in array_jobs] == [str(run / "checkpoints" / f"ckpt-{s:09d}") for s in (3, 6)]
    for j, expected in zip(array_jobs, records):
        with open(j["stdout"]) as fh:
            result = json.loads([line for line in fh if line.startswith("{")][-1])
        # Same samples, same reference: the array job reproduces eval.batch's score.
        assert result["step"] == expected["step"] and result["fid"] == pytest.approx(expected["fid"], rel=1e-6)


def _first_job(run):
    return wait_until(lambda: os.path.exists(run / "slurm" / "jobs.jsonl") and jobs(run)[0], 120, "the submission")[0]


def test_sigusr2_checkpoints_requeues_and_resumes(tmp_path):
    run = tmp_path / "run"
    steps = 25
    proc = launcher_bg(*CPU_ALLOC, "--out", str(run), "--wait", f"train.steps={steps}", "train.ckpt_every=1000", *TINY)
    job = _first_job(run)
    wait_until(lambda: len(metrics(run)) >= 2, 240, "training to start")
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)
    signalled_at = time.time()
    ckpt, _ = wait_until(lambda: [c for c in os.listdir(run / "checkpoints") if not c.endswith(".partial")]
                         if (run / "checkpoints").exists() else None, 120, "the preemption checkpoint")
    lines_before = len(metrics(run))
    _, resumed_at = wait_until(lambda: len(metrics(run)) > lines_before, 240, "the resumed job's first step")
    report("SIGUSR2 -> resumed job's first step", resumed_at - signalled_at)

    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert "REQUEUED" in out and out.rstrip().endswith("COMPLETED")
    preempted_at = int(ckpt[0].split("-")[1])
    assert 2 <= preempted_at < steps
    # Every step trained exactly once: the resumed run continues where the checkpoint was taken.
    assert [m["step"] for m in metrics(run)] == list(range(1, steps + 1))
    log_out = task_log(run, job["job_id"], 0, "out")
    assert f"resumed from {run}/checkpoints/ckpt-{preempted_at:09d} at step {preempted_at}" in log_out
    log_err = task_log(run, job["job_id"], 0)
    assert "requeueing job" in log_err and "requeued 1 times so far" in log_err
    info = json.loads(launcher("status", str(run), "--json").stdout)
    assert info["jobs"][0]["state"] == "COMPLETED" and info["jobs"][0]["requeues"] == 1
    assert info["latest_checkpoint"]["step"] == steps


def test_requeues_are_bounded(tmp_path):
    run = tmp_path / "run"
    proc = launcher_bg(*CPU_ALLOC, "--out", str(run), "--wait", "--max-requeues", "0",
                       "train.steps=200", "train.ckpt_every=1000", *TINY)
    job = _first_job(run)
    wait_until(lambda: metrics(run), 240, "training to start")
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "FAILED" in out and "REQUEUED" not in out
    assert "--max-requeues 0" in err  # the tail of the failed task's log is shown
    assert any(c.startswith("ckpt-") for c in os.listdir(run / "checkpoints"))  # progress kept for a resubmit


def test_in_training_evaluation_job_scores_every_kth_checkpoint_and_keeps_the_best(tmp_path, monkeypatch):
    """train.eval_every under SLURM: the evaluator is a job of its own beside training; it scores
    checkpoints 2, 4, 6, and after the trainer has exited (its lock free) it records what the trainer
    could not read: eval/fid at each checkpoint's step in metrics.jsonl and RUN_DIR/best."""
    monkeypatch.setenv("SNGAN_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    proc = launcher(*CPU_ALLOC[:1], "1", *CPU_ALLOC[2:], "--exp", "default", "--out", str(run), "--wait",
                    "train.steps=6", "train.ckpt_every=2", "train.eval_every=1", "train.eval_extractor=tiny-test",
                    "train.eval_num_samples=64", *TINY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [j["kind"] for j in jobs(run)] == ["train", "eval"]
    with open(run / "eval.jsonl") as fh:
        records = [json.loads(line) for line in fh]
    assert [r["checkpoint"] for r in records] == ["ckpt-000000002", "ckpt-000000004", "ckpt-000000006"]
    fids = {r["step"]: r["fid"] for r in records}
    assert all(v > 0 for v in fids.values())
    logged = {m["step"]: m["eval/fid"] for m in metrics(run) if "eval/fid" in m}
    assert logged == pytest.approx(fids)  # each once, at its checkpoint's step
    best_step = min(fids, key=fids.get)
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == best_step and best["value"] == pytest.approx(fids[best_step])
    assert os.path.realpath(run / "best") == str(run / "checkpoints" / f"ckpt-{best_step:09d}")
