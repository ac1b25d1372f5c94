"""Submit training and evaluation to SLURM through submitit; show a run's state.

    python launch/slurm.py --nodes 4 --exp imagenet128 train.batch_size=64   # train (the default command)
    python launch/slurm.py eval RUN_DIR [--array]                            # evaluate checkpoints
    python launch/slurm.py status RUN_DIR                                    # job states, latest metrics
    python launch/slurm.py prepare SRC OUT --tasks 32 -- --source imagenet --resolution 128   # shards

Training is one task per GPU (SLURM starts every process; see launch/README.md
for why), each running trainer.main.main() with torch.distributed set up from
the SLURM environment (launch/slurm_task.py). Everything a run produces lives
in its run folder: the trainer's checkpoints/, metrics.jsonl, samples/, and
slurm/<job id>/ with the submitit logs, plus slurm/jobs.jsonl, the record of
what was submitted, which `status` reads.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script path: make the repository importable
    sys.path.insert(0, REPO)

from launch import preflight, run_status  # noqa: E402
from launch.slurm_task import EvalTask, TrainTask  # noqa: E402

COMMANDS = ("train", "eval", "status", "prepare")
TERMINAL_OK = "COMPLETED"
TRAIN_TIME, EVAL_TIME, PREPARE_TIME = "24:00:00", "4:00:00", "4:00:00"


# ----------------------------------------------------------------------------- arguments
def parse_time_minutes(text: str) -> int:
    """SLURM's --time formats ('90', '4:00:00', '2-00:00:00', '1-12') -> whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"--time {text!r}: use MIN, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = a, b or 0, c or 0
        total_s = ((days * 24 + h) * 60 + mi) * 60 + s
    elif c is not None:   # HH:MM:SS
        total_s = (a * 60 + b) * 60 + c
    elif b is not None:   # MM:SS
        total_s = a * 60 + b
    else:                 # MM
        total_s = a * 60
    if total_s <= 0:
        raise argparse.ArgumentTypeError(f"--time {text!r} must be positive")
    return -(-total_s // 60)


def _non_negative(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return v


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return v


def _add_slurm_options(p: argparse.ArgumentParser, time_default: str, nodes_default: int) -> None:
    g = p.add_argument_group("allocation (sbatch options)")
    g.add_argument("--nodes", type=_positive, default=nodes_default, help="nodes to allocate")
    g.add_argument("--gpus-per-node", type=_non_negative, default=8,
                   help="GPUs per node = tasks per node; 0 runs one CPU task per node with the gloo backend")
    g.add_argument("--cpus-per-task", type=_positive, default=8, help="CPU cores per task (data loading, OMP threads)")
    g.add_argument("--mem", default=None, help="memory per node, e.g. 64G; 0 = all of it (default: the cluster's)")
    g.add_argument("--partition", default=None, help="partition (default: the cluster's default)")
    g.add_argument("--account", default=None, help="account to charge")
    g.add_argument("--qos", default=None, help="quality of service")
    g.add_argument("--time", type=parse_time_minutes, default=time_default,
                   help="time limit per job run: MIN, HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--constraint", default=None, help="node features, e.g. 'a100|h100'")
    g.add_argument("--job-name", default=None, help="job name (default: sngan-<exp> / sngan-eval-<run>)")
    g.add_argument("--signal-delay", type=_positive, default=120, metavar="S",
                   help="SLURM sends SIGUSR2 this many seconds before the time limit (checkpoint, then requeue)")
    b = p.add_argument_group("behaviour")
    b.add_argument("--wait", action="store_true", help="block until the job ends and exit with its status")
    b.add_argument("--dry-run", action="store_true", help="print the sbatch parameters and the resolved config; "
                                                          "submit nothing")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except unset ones (None/False), whose help says what happens instead."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    fmt = _HelpFormatter
    train = argparse.ArgumentParser(
        prog="python launch/slurm.py [train]", formatter_class=fmt,
        description="Submit SN-GAN training to SLURM (one task per GPU), requeued on preemption and time "
                    "limits until it finishes. Other commands: `eval RUN_DIR`, `status RUN_DIR`.",
        epilog="Trailing key=value arguments are dotted config overrides for the trainer, "
               "e.g. train.batch_size=64 train.steps=100000.")
    train.add_argument("--exp", default="default", help="experiment (launch/experiments/NAME.yaml) or a YAML path")
    train.add_argument("--out", default=None, help="run folder (default: runs/<exp>-<timestamp>); an existing run "
                                                   "folder is resumed from its newest checkpoint")
    train.add_argument("--max-requeues", type=_non_negative, default=10,
                       help="stop requeueing after this many preemptions/time limits of the job")
    train.add_argument("--eval", action="store_true",
                       help="also submit `eval.batch RUN_DIR` on its own allocation, to start when training succeeds")
    _add_slurm_options(train, time_default=TRAIN_TIME, nodes_default=1)
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides for the trainer")

    ev = argparse.ArgumentParser(
        prog="python launch/slurm.py eval", formatter_class=fmt,
        description="Submit evaluation of a run's checkpoints: one job running `eval.batch RUN_DIR` over all "
                    "of them (results in RUN_DIR/eval.jsonl), or with --array a SLURM array with one "
                    "`eval.main --ckpt CKPT` job per checkpoint (results in each array job's log).",
        epilog="Arguments after `--` are passed on to the evaluator.")
    ev.add_argument("run_dir", help="run folder (with checkpoints/)")
    ev.add_argument("--array", action="store_true", help="one array job per complete checkpoint in RUN_DIR")
    ev.add_argument("--checkpoints", default="all", help="with --array: 'all', 'latest', or steps like 1000,2000")
    _add_slurm_options(ev, time_default=EVAL_TIME, nodes_default=1)

    st = argparse.ArgumentParser(prog="python launch/slurm.py status", formatter_class=fmt,
                                 description="Show a run's SLURM jobs, their state, and the latest metrics.")
    st.add_argument("run_dir", help="run folder")
    st.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    pr = argparse.ArgumentParser(
        prog="python launch/slurm.py prepare", formatter_class=fmt,
        description="Submit `python -m data_pipelines.prepare SRC OUT ...` as a SLURM array: task K of N converts "
                    "slice K/N of the source (--slice K/N), then one job, started when every task has succeeded, "
                    "assembles the shards and the manifest (the same command without --slice). The result is the "
                    "one a single process would write. Submitted jobs are recorded in OUT/slurm/jobs.jsonl "
                    "(`status OUT` shows them).",
        epilog="Arguments after `--` are prepare's own (--source is required there), e.g. "
               "-- --source imagenet --resolution 128.")
    pr.add_argument("src", help="source, as prepare takes it (e.g. the folder holding ILSVRC2012_img_train.tar)")
    pr.add_argument("out", help="output folder (shared by all nodes)")
    pr.add_argument("--tasks", type=_positive, default=4, help="array tasks (slices of the source)")
    _add_slurm_options(pr, time_default=PREPARE_TIME, nodes_default=1)
    return {"train": train, "eval": ev, "status": st, "prepare": pr}


# ----------------------------------------------------------------------------- submission
def sbatch_parameters(args, job_name: str, tasks_per_node: int) -> dict:
    """submitit SlurmExecutor parameters (names as in submitit's _make_sbatch_string)."""
    params = {
        "job_name": job_name,
        "nodes": args.nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": args.cpus_per_task,
        "time": args.time,  # minutes
        "signal_delay_s": args.signal_delay,
        # The job imports launch/, trainer/, eval/ from this checkout, with this Python.
        "setup": [f"export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}"],
        # Requeue on node failure too, and allow `scontrol requeue` whatever the cluster's JobRequeue says.
        "additional_parameters": {"requeue": True},
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("mem", "partition", "account", "qos", "constraint"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    return params


def sbatch_script(folder: str, params: dict) -> str:
    """The sbatch file submitit will write for these parameters (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string  # the function submitit itself uses

    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(folder)}"
    return _make_sbatch_string(command=command, folder=folder, **params)


def make_executor(run_dir: str, params: dict, max_requeues: int = 3):
    import submitit

    executor = submitit.SlurmExecutor(folder=os.path.join(run_dir, "slurm", "%j"), max_num_timeout=max_requeues)
    executor.update_parameters(**params)
    return executor


def record_job(run_dir: str, kind: str, job, argv: list[str]) -> dict:
    """Appends the job to RUN_DIR/slurm/jobs.jsonl (read by `status`) and returns the record."""
    entry = {
        "job_id": str(job.job_id),
        "kind": kind,
        "submitted": _dt.datetime.now().isoformat(timespec="seconds"),
        "submitted_unix": round(time.time(), 3),
        "stdout": str(job.paths.stdout),
        "stderr": str(job.paths.stderr),
        "argv": argv,
    }
    os.makedirs(os.path.join(run_dir, "slurm"), exist_ok=True)
    with open(run_status.jobs_file(run_dir), "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return entry


def print_submitted(entries: list[dict], run_dir: str, what: str) -> None:
    first = entries[0]
    job = first["job_id"] if len(entries) == 1 else f"{first['job_id'].split('_')[0]} (array of {len(entries)})"
    print(f"submitted job {job} ({what})")
    print(f"  run folder: {run_dir}")
    print(f"  logs:       {first['stdout']}")
    print(f"              {first['stderr']}  (task 0; task N writes *_N_log.*)")
    print(f"  status:     python launch/slurm.py status {shlex.quote(run_dir)}", flush=True)


def print_dry_run(what: str, run_dir: str, params: dict, tasks: list) -> None:
    print(f"# dry run: nothing submitted ({what})")
    print(f"# run folder: {run_dir}")
    print("# submitit parameters:\n" + json.dumps(params, indent=2, sort_keys=True))
    array = {"map_count": len(tasks)} if len(tasks) > 1 else {}
    print("# sbatch file:\n" + sbatch_script(os.path.join(run_dir, "slurm", "%j"), {**params, **array}))
    for t in tasks:
        print(f"# {'each task' if len(tasks) == 1 else 'array job'} runs: python -m {t.module} {shlex.join(t.argv)}")


def submit(run_dir: str, kind: str, what: str, params: dict, tasks: list, max_requeues: int = 3) -> list[dict]:
    """Submits one job, or one `sbatch --array` when there are several tasks; records and prints them."""
    executor = make_executor(run_dir, params, max_requeues)
    with executor.batch() if len(tasks) > 1 else contextlib.nullcontext():
        jobs = [executor.submit(t) for t in tasks]
    entries = [record_job(run_dir, kind, j, [t.module, *t.argv]) for j, t in zip(jobs, tasks)]
    print_submitted(entries, run_dir, what)
    return entries


def resolved_config(exp: str, overrides: list[str]) -> tuple[int, str, str]:
    """The trainer's `--dry-run` output: (status, resolved YAML, errors)."""
    from trainer.main import main as trainer_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = trainer_main(["--exp", exp, "--dry-run", *overrides])
    return rc, out.getvalue(), err.getvalue()


def wait_for(job_id: str, poll_s: float = 2.0, report_every_s: float = 60.0) -> int:
    """Blocks until the job (and any requeue of it) is over; 0 if it COMPLETED, else its exit code or 1.

    While the job pends, its reason is printed when it changes and every ``report_every_s``; a reason
    that waiting cannot clear (:data:`launch.preflight.FATAL_REASONS`) cancels the job and returns 2.
    """
    last, last_reason, reported, requeues = None, None, 0.0, 0
    while True:
        info = run_status.sacct([job_id]).get(job_id)
        state = info["State"].split()[0] if info else "PENDING"  # not in accounting yet
        if state != last:
            # A requeue: the earlier run shows as REQUEUED in accounting; say so even when the
            # transient REQUEUED state (or the whole first run, on a slow poller) fell between polls.
            n = run_status.requeue_counts([job_id]).get(job_id, 0)
            if n > requeues and state != "REQUEUED":
                print(f"job {job_id}: REQUEUED ({n} so far)", flush=True)
            requeues = max(requeues, n)
            print(f"job {job_id}: {state}", flush=True)
            last = state
        if state == "PENDING":
            reason = preflight.pending_reason(job_id)
            reason = None if reason in ("None", "") else reason
            if reason and (reason != last_reason or time.time() - reported > report_every_s):
                print(f"job {job_id}: pending ({reason})", flush=True)
                last_reason, reported = reason, time.time()
            if preflight.is_fatal(reason):
                subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
                print(f"error: job {job_id} cannot start (SLURM reason {reason}: the request does not fit the "
                      f"partition or account); cancelled it", file=sys.stderr, flush=True)
                return 2
        if state not in run_status.ACTIVE_STATES:
            break
        time.sleep(poll_s)
    if state == TERMINAL_OK:
        return 0
    return int(info.get("ExitCode", "1:0").split(":")[0] or 0) or 1


def show_failure(entry: dict) -> None:
    path = entry["stderr"]
    if os.path.exists(path):
        with open(path, errors="replace") as fh:
            tail = fh.readlines()[-25:]
        print(f"--- last lines of {path}:", file=sys.stderr)
        sys.stderr.writelines(tail)


def wait_all(entries: list[dict]) -> int:
    """--wait: every job's end; the worst status."""
    codes = [wait_for(e["job_id"]) for e in entries]
    for entry, code in zip(entries, codes):
        if code:
            show_failure(entry)
    return max(codes, default=0)


def cmd_train(args) -> int:
    if os.path.isfile(args.exp):  # a YAML path: the same file whatever the job's working directory
        args.exp = os.path.abspath(args.exp)
    exp_name = os.path.splitext(os.path.basename(args.exp))[0]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.abspath(args.out or os.path.join("runs", f"{exp_name}-{stamp}"))
    tasks_per_node = max(args.gpus_per_node, 1)
    params = sbatch_parameters(args, args.job_name or f"sngan-{exp_name}", tasks_per_node)
    task = TrainTask(["--exp", args.exp, "--out", run_dir, *args.overrides],
                     gpus_per_node=args.gpus_per_node, max_requeues=args.max_requeues)
    what = (f"train, {args.nodes} node(s) x {tasks_per_node} task(s) = {args.nodes * tasks_per_node} "
            f"process(es), {'gloo on CPU' if args.gpus_per_node == 0 else 'one GPU each'}")
    rc, config_yaml, errors = resolved_config(args.exp, args.overrides)
    if rc != 0:  # fail now, not after waiting in the queue
        sys.stderr.write(errors)
        return rc
    import yaml
    world = args.nodes * tasks_per_node
    try:
        preflight.check_world(yaml.safe_load(config_yaml) or {}, world)
        if not args.dry_run:
            preflight.require_slurm()
        if shutil.which("sinfo") is not None:   # a dry run on a machine without SLURM skips this part
            try:
                part = preflight.read_partition(args.partition)
                preflight.check_allocation(part, args.nodes, tasks_per_node, args.cpus_per_task, args.gpus_per_node,
                                           args.mem, args.time)
            except preflight.PreflightError as exc:
                if not args.dry_run:
                    raise
                # A dry run may preview a job for another cluster: say what this one would refuse.
                print(f"warning: this cluster would refuse the request: {exc}", file=sys.stderr)
    except preflight.PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The evaluator gets its own, smaller allocation: one node, the eval command's default time.
    eval_args = argparse.Namespace(**{**vars(args), "nodes": 1, "time": parse_time_minutes(EVAL_TIME)},
                                   array=False, eval_args=[])
    config = yaml.safe_load(config_yaml) or {}
    watch = None
    if int((config.get("train") or {}).get("eval_every") or 0) > 0:
        # train.eval_every: the trainer's evaluator runs as a job of its own, beside training.
        from trainer.config import load_config
        from trainer.evaluation import evaluator_args
        params["setup"] = [*params["setup"], "export SNGAN_EVAL_EXTERNAL=1"]
        watch_params = sbatch_parameters(argparse.Namespace(**{**vars(args), "nodes": 1}),
                                         f"{args.job_name or 'sngan-' + exp_name}-evalwatch", max(args.gpus_per_node, 1))
        watch = JobPlan("in-training evaluation (eval.batch --watch, beside training)", watch_params,
                        [EvalTask("eval.batch", [*evaluator_args(load_config(args.exp, args.overrides), run_dir),
                                                 "--after-trainer"], args.gpus_per_node)])
    if args.dry_run:
        print_dry_run(what, run_dir, params, [task])
        print("# resolved config:\n" + config_yaml, end="")
        if watch is not None:
            watch.show(run_dir)
        if args.eval:
            eval_plan(run_dir, eval_args, after="TRAIN_JOB_ID").show(run_dir)
        return 0
    entries = submit(run_dir, "train", what, params, [task], args.max_requeues)
    if watch is not None:
        entries += watch.submit(run_dir, "eval")
    if args.eval:
        entries += eval_plan(run_dir, eval_args, after=entries[0]["job_id"]).submit(run_dir, "eval")
    return wait_all(entries) if args.wait else 0


def select_checkpoints(run_dir: str, which: str) -> list[str]:
    ckpts = run_status.complete_checkpoints(run_dir)
    if which == "all":
        return ckpts
    if which == "latest":
        return ckpts[-1:]
    try:
        wanted = {int(s) for s in which.split(",")}
    except ValueError:
        raise SystemExit(f"--checkpoints {which!r}: use all, latest, or steps like 1000,2000") from None
    steps = {run_status.checkpoint_step(c): c for c in ckpts}
    missing = sorted(wanted - set(steps))
    if missing:
        raise SystemExit(f"--checkpoints: no complete checkpoint for step(s) {missing} in {run_dir} "
                         f"(have: {sorted(steps)})")
    return [steps[s] for s in sorted(wanted)]


@dataclass
class JobPlan:
    """One job (or array) to submit: what it is, its submitit/sbatch parameters, its tasks."""
    what: str
    params: dict
    tasks: list

    def show(self, run_dir: str) -> None:
        print_dry_run(self.what, run_dir, self.params, self.tasks)

    def submit(self, run_dir: str, kind: str, max_requeues: int = 3) -> list[dict]:
        return submit(run_dir, kind, self.what, self.params, self.tasks, max_requeues)


def eval_plan(run_dir: str, args, after: str | None = None) -> JobPlan:
    """The job that evaluates the run's checkpoints."""
    run_name = os.path.basename(run_dir.rstrip("/"))
    name = (f"{args.job_name}-eval" if args.job_name and after else args.job_name) or f"sngan-eval-{run_name}"
    params = sbatch_parameters(args, name, max(args.gpus_per_node, 1))
    if after:
        params["dependency"] = f"afterok:{after}"
    if args.array:
        ckpts = select_checkpoints(run_dir, args.checkpoints)
        if not ckpts:
            raise SystemExit(f"error: no complete checkpoint in {run_dir}/checkpoints")
        if "--ref" not in args.eval_args:
            raise SystemExit("error: eval --array runs `eval.main --ckpt CKPT` per checkpoint, which needs reference "
                             "statistics: add `-- --ref STATS.npz` (python -m eval.reference makes one; "
                             "eval.batch, without --array, derives them from the run's config)")
        tasks = [EvalTask("eval.main", ["--ckpt", c, *args.eval_args], args.gpus_per_node) for c in ckpts]
        what = f"eval array: {len(tasks)} checkpoint(s), one allocation each"
    else:
        tasks = [EvalTask("eval.batch", [run_dir, *args.eval_args], args.gpus_per_node)]
        what = "eval.batch over all checkpoints" + (f", after job {after} succeeds" if after else "")
    return JobPlan(what, params, tasks)


def cmd_eval(args) -> int:
    run_dir = os.path.abspath(args.run_dir)
    if not os.path.isdir(run_dir):
        print(f"error: run folder {run_dir} does not exist", file=sys.stderr)
        return 2
    plan = eval_plan(run_dir, args)
    what, params, tasks = plan.what, plan.params, plan.tasks
    if args.dry_run:
        plan.show(run_dir)
        return 0
    try:
        preflight.require_slurm()
        part = preflight.read_partition(args.partition)
        preflight.check_allocation(part, args.nodes, max(args.gpus_per_node, 1), args.cpus_per_task,
                                   args.gpus_per_node, args.mem, args.time)
    except preflight.PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    entries = submit(run_dir, "eval", what, params, tasks)
    return wait_all(entries) if args.wait else 0


def cmd_prepare(args) -> int:
    from data_pipelines.prepare import build_parser as prepare_parser

    out = os.path.abspath(args.out)
    src = os.path.abspath(args.src)
    try:
        if not os.path.exists(src):
            raise preflight.PreflightError(f"source {src!r} does not exist (give a path all nodes can read)")
        if args.nodes != 1:
            raise preflight.PreflightError(f"--nodes {args.nodes}: each prepare task runs on one node; "
                                           f"use --tasks to spread the work over nodes")
        if any(a == "--slice" or a.startswith("--slice=") for a in args.prepare_args):
            raise preflight.PreflightError("--slice is set by the launcher for each array task; remove it")
        if any(a in ("--workers", "--overwrite") or a.startswith(("--workers=", "--overwrite="))
               for a in args.prepare_args):
            raise preflight.PreflightError("--workers is set from --cpus-per-task, and --overwrite cannot be used "
                                           "with slices (clear OUT first); remove them after `--`")
    except preflight.PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            prepare_parser().parse_args([src, out, *args.prepare_args])  # bad prepare options fail now
        except SystemExit:
            print(f"error: prepare options {shlex.join(args.prepare_args)!r}: "
                  f"{err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else 'invalid'}",
                  file=sys.__stderr__)
            return 2
    workers = ["--workers", str(args.cpus_per_task), "--quiet"]
    argv = [src, out, *args.prepare_args, *workers]
    tasks = [EvalTask("data_pipelines.prepare", [*argv, "--slice", f"{k}/{args.tasks}"], 0)
             for k in range(args.tasks)]
    name = args.job_name or f"sngan-prepare-{os.path.basename(out.rstrip('/'))}"
    params = sbatch_parameters(args, name, 1)
    params.pop("gpus_per_node", None)
    merge_params = dict(params, job_name=f"{name}-merge")
    what = f"prepare array: {args.tasks} slice(s) of {src}, {args.cpus_per_task} worker(s) each"
    merge = [EvalTask("data_pipelines.prepare", argv, 0)]
    if args.dry_run:
        print_dry_run(what, out, params, tasks)
        print_dry_run("prepare merge: assembles the shards after every slice succeeded",
                      out, {**merge_params, "dependency": "afterok:ARRAY_JOB_ID"}, merge)
        return 0
    try:
        preflight.require_slurm()
        part = preflight.read_partition(args.partition)
        preflight.check_allocation(part, 1, 1, args.cpus_per_task, 0, args.mem, args.time)
    except preflight.PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    entries = submit(out, "prepare", what, params, tasks, max_requeues=3)
    array_id = entries[0]["job_id"].split("_")[0]
    merge_params["dependency"] = f"afterok:{array_id}"
    entries += submit(out, "prepare", f"prepare merge, after job {array_id} succeeds", merge_params, merge)
    return wait_all(entries) if args.wait else 0


def cmd_status(args) -> int:
    return run_status.show(os.path.abspath(args.run_dir), as_json=args.json)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    parser = build_parsers()[command]
    if command == "train":  # options may follow the key=value overrides
        return cmd_train(parser.parse_intermixed_args(argv))
    if command == "status":
        return cmd_status(parser.parse_args(argv))
    cut = argv.index("--") if "--" in argv else len(argv)  # what follows `--` is the evaluator's
    args = parser.parse_args(argv[:cut])
    if command == "prepare":
        args.prepare_args = argv[cut + 1:]
        return cmd_prepare(args)
    args.eval_args = argv[cut + 1:]
    return cmd_eval(args)


if __name__ == "__main__":
    sys.exit(main())
