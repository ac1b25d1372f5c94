"""launch/slurm.py without a cluster: --help, --dry-run, time parsing, eval planning, status, requeue bound."""

from __future__ import annotations

import json
import os

import pytest

from launch import slurm
from launch.slurm_task import RequeueLimitReached, TrainTask


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("4:00:00", 240), ("1:30", 2), ("2-00:00:00", 2880), ("1-12", 2160), ("0:00:30", 1),
])
def test_time_formats(text, minutes):
    assert slurm.parse_time_minutes(text) == minutes


@pytest.mark.parametrize("bad", ["", "1h", "0", "-5", "1:2:3:4"])
def test_bad_time_is_rejected_with_the_formats(bad):
    with pytest.raises(Exception, match="MIN, HH:MM:SS|positive"):
        slurm.parse_time_minutes(bad)


def test_bad_time_on_the_command_line_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        slurm.main(["--time", "1h", "--dry-run"])
    assert exc.value.code == 2 and "--time '1h': use MIN, HH:MM:SS or D-HH:MM:SS" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["eval"], ["status"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        slurm.main([*command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python launch/slurm.py" in text
    if not command:
        for option in ("--gpus-per-node", "--cpus-per-task", "--mem", "--partition", "--account", "--qos",
                       "--time", "--constraint", "--job-name", "--out", "--wait", "--dry-run", "--eval"):
            assert option in text
        assert "(default: 24:00:00)" in text and "(default: 8)" in text


def test_train_dry_run_prints_sbatch_and_config_and_submits_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    rc = slurm.main(["--nodes", "4", "--exp", "default", "--out", str(run), "--partition", "gpu", "--mem", "64G",
                     "--time", "2-00:00:00", "--account", "gan", "--qos", "high", "--constraint", "a100",
                     "--dry-run", "train.steps=20"])
    out = capsys.readouterr().out
    assert rc == 0
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "#SBATCH --mem=64G",
                 "#SBATCH --time=2880", "#SBATCH --account=gan", "#SBATCH --qos=high", "#SBATCH --constraint=a100",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --job-name=sngan-default",
                 f"#SBATCH --output={run}/slurm/%j/%j_0_log.out"):
        assert line in out
    assert "32 process(es), one GPU each" in out
    assert f"trainer.main --exp default --out {run} train.steps=20" in out
    assert "# resolved config:" in out and "steps: 20" in out
    assert not run.exists()


def test_cpu_dry_run_is_one_task_per_node_without_gpus(tmp_path, capsys):
    assert slurm.main(["--nodes", "2", "--gpus-per-node", "0", "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=1" in out and "--gpus-per-node" not in out.split("# sbatch file:")[1]
    assert "2 process(es), gloo on CPU" in out


def test_bad_override_fails_before_submitting(tmp_path, capsys):
    assert slurm.main(["--out", str(tmp_path / "r"), "--dry-run", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def fake_run(tmp_path, steps=(2, 4)):
    run = tmp_path / "run"
    for s in steps:
        ckpt = run / "checkpoints" / f"ckpt-{s:09d}"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text(json.dumps({"format": "sngan-checkpoint/1", "step": s, "images_seen": 8 * s}))
    (run / "checkpoints" / "ckpt-000000006.partial").mkdir()  # an interrupted save: never evaluated
    lines = [{"step": 3, "images_seen": 24, "loss/d": 1.5, "loss/g": 0.25}, {"step": 4, "images_seen": 32,
             "loss/d": 1.25, "loss/g": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 5, "ima')
    return run


def test_eval_batch_dry_run(tmp_path, capsys):
    run = fake_run(tmp_path)
    assert slurm.main(["eval", str(run), "--gpus-per-node", "1", "--dry-run", "--", "--num-samples", "500"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --time=240" in out and "#SBATCH --gpus-per-node=1" in out and "--array" not in out
    assert f"python -m eval.batch {run} --num-samples 500" in out


def test_eval_array_dry_run_one_job_per_complete_checkpoint(tmp_path, capsys):
    run = fake_run(tmp_path)
    assert slurm.main(["eval", str(run), "--array", "--dry-run", "--", "--ref", "r.npz"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-1%2" in out
    assert f"--output={run}/slurm/%A_%a/%A_%a_0_log.out" in out
    runs = [line for line in out.splitlines() if line.startswith("# array job runs:")]
    assert runs == [f"# array job runs: python -m eval.main --ckpt {run}/checkpoints/ckpt-{s:09d} --ref r.npz"
                    for s in (2, 4)]

    assert slurm.main(["eval", str(run), "--array", "--checkpoints", "4", "--dry-run", "--", "--ref", "r.npz"]) == 0
    assert "ckpt-000000004" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"step\(s\) \[6\].*have: \[2, 4\]"):
        slurm.main(["eval", str(run), "--array", "--checkpoints", "4,6", "--dry-run", "--", "--ref", "r.npz"])
    with pytest.raises(SystemExit, match="needs reference statistics"):
        slurm.main(["eval", str(run), "--array", "--dry-run"])


def test_eval_of_a_missing_run_folder(tmp_path, capsys):
    assert slurm.main(["eval", str(tmp_path / "nope"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_dry_run_with_eval_shows_the_dependent_job(tmp_path, capsys):
    assert slurm.main(["--nodes", "4", "--out", str(tmp_path / "r"), "--eval", "--dry-run"]) == 0
    eval_part = capsys.readouterr().out.split("eval.batch over all checkpoints")[1]
    assert "#SBATCH --dependency=afterok:TRAIN_JOB_ID" in eval_part
    assert "#SBATCH --nodes=1" in eval_part and "#SBATCH --time=240" in eval_part


def test_status_without_jobs_shows_checkpoint_and_metrics(tmp_path, capsys):
    run = fake_run(tmp_path)
    assert slurm.main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "jobs: none submitted from here" in out
    assert f"latest checkpoint: {run}/checkpoints/ckpt-000000004 (step 4)" in out
    assert "step=4  images_seen=32  loss/d=1.25  loss/g=0.5" in out  # the half-written line is skipped
    assert slurm.main(["status", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["latest_checkpoint"]["step"] == 4 and info["metrics"]["step"] == 4
    assert slurm.main(["status", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_requeue_bound(monkeypatch):
    task = TrainTask(["--out", "x"], gpus_per_node=0, max_requeues=2)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert task.checkpoint() is not None  # submitit's own handler may still requeue
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert task.checkpoint() is None
    with pytest.raises(RequeueLimitReached, match="requeued 2 times.*--max-requeues 2"):
        task._requeue_and_wait()


def test_preempted_status_matches_the_trainer():
    from launch.slurm_task import EXIT_PREEMPTED
    from trainer.main import EXIT_PREEMPTED as TRAINER_EXIT_PREEMPTED

    assert EXIT_PREEMPTED == TRAINER_EXIT_PREEMPTED
    assert os.path.basename(slurm.REPO) and os.path.isfile(os.path.join(slurm.REPO, "trainer", "main.py"))


def test_in_training_evaluation_is_its_own_job(tmp_path, capsys):
    """train.eval_every under SLURM: the trainer is told not to start an evaluator
    (SNGAN_EVAL_EXTERNAL=1) and eval.batch --watch runs as a job of its own, beside training."""
    run = tmp_path / "run"
    rc = slurm.main(["--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--exp", "default", "--out",
                     str(run), "--dry-run", "train.steps=20", "train.ckpt_every=5", "train.eval_every=2",
                     "train.eval_extractor=tiny-test", "train.eval_num_samples=50"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "export SNGAN_EVAL_EXTERNAL=1" in out
    assert "# dry run: nothing submitted (in-training evaluation" in out
    watch = out.split("in-training evaluation")[1]
    assert f"python -m eval.batch {run} --watch" in watch and "--every-steps 10 --final-step 20" in watch
    assert "--extractor tiny-test" in watch and "--num-samples 50" in watch and "--after-trainer" in watch
