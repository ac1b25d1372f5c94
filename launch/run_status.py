"""What `python launch/slurm.py status RUN_DIR` reads and shows.

A run folder's SLURM jobs are listed in RUN_DIR/slurm/jobs.jsonl (written by
launch/slurm.py at submission); their states come from `sacct`. Progress comes
from the trainer's own files: the last line of metrics.jsonl and the newest
complete checkpoint (checkpoints/ckpt-<step>/meta.json); scores from the last
line of eval.jsonl (written by eval.batch).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

# States in which a job (or its requeued run) may still produce something.
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                 "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "PREEMPTED", "RESV_DEL_HOLD"}
SHOWN_METRICS = ("step", "images_seen", "loss/d", "loss/g", "perf/images_per_s")
SHOWN_EVAL = ("fid", "is", "kid", "intra_fid")


def jobs_file(run_dir: str) -> str:
    return os.path.join(run_dir, "slurm", "jobs.jsonl")


def read_jobs(run_dir: str) -> list[dict]:
    try:
        with open(jobs_file(run_dir)) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def sacct(job_ids: list[str], duplicates: bool = False) -> dict[str, dict]:
    """{job id: sacct fields} for the jobs' allocations (the latest run of each, or every run
    with duplicates=True, keyed 'id#n'). Empty when sacct is missing or the ids are unknown yet."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-X", "--parsable2", "-o", "JobID,State,ExitCode,Elapsed,Start,End,NodeList",
           "-j", ",".join(job_ids)]
    if duplicates:
        cmd.append("--duplicates")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    lines = out.splitlines()
    if len(lines) < 2:
        return {}
    names = lines[0].split("|")
    rows: dict[str, dict] = {}
    for line in lines[1:]:
        row = dict(zip(names, line.split("|")))
        key = row["JobID"]
        n = 0
        while duplicates and f"{key}#{n}" in rows:
            n += 1
        rows[f"{key}#{n}" if duplicates else key] = row
    return rows


def requeue_counts(job_ids: list[str]) -> dict[str, int]:
    """How many times each job was requeued (its earlier runs show as REQUEUED in accounting)."""
    counts = {j: 0 for j in job_ids}
    for key, row in sacct(job_ids, duplicates=True).items():
        job = key.split("#")[0]
        if job in counts and row["State"].startswith("REQUEUED"):
            counts[job] += 1
    return counts


def checkpoint_step(path: str) -> int:
    m = re.search(r"ckpt-(\d+)$", path.rstrip("/"))
    return int(m.group(1)) if m else -1


def complete_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint folders, oldest first (the trainer's own definition of complete)."""
    from trainer.checkpoint import list_checkpoints

    return list_checkpoints(os.path.join(run_dir, "checkpoints"))


def last_record(path: str) -> dict | None:
    """The last complete JSON line of a .jsonl file (a line being written is skipped)."""
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def collect(run_dir: str) -> dict:
    jobs = read_jobs(run_dir)
    ids = [j["job_id"] for j in jobs]
    states = sacct(ids)
    requeues = requeue_counts(ids) if states else {}
    for j in jobs:
        row = states.get(j["job_id"], {})
        j["state"] = row.get("State", "UNKNOWN" if states or not ids else "UNKNOWN (sacct unavailable)")
        j.update({k.lower(): row[k] for k in ("ExitCode", "Elapsed", "Start", "End", "NodeList") if k in row})
        j["requeues"] = requeues.get(j["job_id"], 0)
    ckpts = complete_checkpoints(run_dir)
    latest = None
    if ckpts:
        from trainer.checkpoint import read_meta

        meta = read_meta(ckpts[-1])
        latest = {"path": ckpts[-1], "step": meta.get("step"), "images_seen": meta.get("images_seen")}
    return {"run_dir": run_dir, "jobs": jobs, "latest_checkpoint": latest,
            "metrics": last_record(os.path.join(run_dir, "metrics.jsonl")),
            "eval": last_record(os.path.join(run_dir, "eval.jsonl"))}


def show(run_dir: str, as_json: bool = False) -> int:
    if not os.path.isdir(run_dir):
        print(f"error: run folder {run_dir} does not exist", file=sys.stderr)
        return 2
    info = collect(run_dir)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"run folder: {run_dir}")
    if not info["jobs"]:
        print("jobs: none submitted from here (no slurm/jobs.jsonl)")
    for j in info["jobs"]:
        extra = f", requeued {j['requeues']}x" if j.get("requeues") else ""
        print(f"job {j['job_id']:>10} {j['kind']:<5} {j['state']:<12} elapsed {j.get('elapsed', '-')}"
              f" nodes {j.get('nodelist', '-')}{extra}")
        print(f"{'':>16} log {j['stdout']}")
    c = info["latest_checkpoint"]
    print(f"latest checkpoint: {c['path']} (step {c['step']})" if c else "latest checkpoint: none")
    m = info["metrics"]
    if m:
        print("latest metrics: " + "  ".join(f"{k}={_fmt(m[k])}" for k in SHOWN_METRICS if k in m))
    else:
        print("latest metrics: none yet (no metrics.jsonl)")
    e = info["eval"]
    if e:
        scores = "  ".join(f"{k}={_fmt(e[k])}" for k in SHOWN_EVAL if e.get(k) is not None)
        print(f"latest evaluation: {e.get('checkpoint')}  {scores or 'error: ' + str(e.get('error'))}")
    return 0


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
