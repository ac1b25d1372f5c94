"""Evaluate every checkpoint of a run: ``python -m eval.batch RUN_DIR [--watch]``.

Walks ``RUN_DIR/checkpoints/ckpt-*/`` (complete ones: with ``meta.json``), evaluates each one not
yet evaluated with these settings, and appends one JSON line per checkpoint to
``RUN_DIR/eval.jsonl`` (plus ``eval/<metric>`` scalars in ``RUN_DIR/tb`` at the checkpoint's step).
``--watch`` keeps polling for new checkpoints.

Each checkpoint is evaluated once even when several evaluators run: before evaluating, an
evaluator claims ``RUN_DIR/eval-claims/<ckpt>.<settings>.claim`` with an exclusive create, which
only one can win. Claims stay as markers; a claim older than ``--stale-after`` without a result
(its evaluator died) is taken over by renaming it away first, which again only one evaluator can do.
Under ``accelerate launch`` / ``torchrun`` rank 0 claims and all ranks evaluate together.

Without ``--ref`` the reference statistics of the run's dataset (``RUN_DIR/config.yaml``:
``data.*``) are computed once and cached (:mod:`eval.reference`).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from typing import Iterator, List, Optional, Set

if __package__ in (None, ""):  # run as a script path: the repository root on sys.path, not this folder (ARCHITECTURE.md)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from trainer import dist
from eval.ckpt import CheckpointError, complete_checkpoints
from eval.data import open_source
from eval.generate import NonFiniteSamples
from eval.main import EvalOptions, add_eval_args, evaluate, options_from_args
from eval.reference import compute_reference, make_extractor
from eval.statsfile import load_stats
from trainer.errors import MissingInput, UsageError

RESULTS = "eval.jsonl"
CLAIMS = "eval-claims"


def settings_tag(opts: EvalOptions, ref_key: str, family: str) -> str:
    ident = {"metrics": sorted(opts.metrics), "n": opts.num_samples, "per_class": opts.per_class,
             "seed": opts.seed, "which": opts.which, "ref": ref_key, "features": family}
    if any(m in opts.metrics for m in ("precision", "recall", "density", "coverage")):  # absent: older tags hold
        ident["prdc"] = [opts.prdc_k, opts.prdc_num]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def jsonl_records(path: str) -> Iterator[dict]:
    """The records of a JSON-lines file (none if it does not exist); a line cut by a crash is skipped."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def evaluated(run_dir: str, tag: str) -> Set[str]:
    """Names of checkpoints with a line for these settings in eval.jsonl (a result, an error, or
    "skipped" because it was pruned before its turn); a cut line counts as not done."""
    return {rec.get("checkpoint") for rec in jsonl_records(os.path.join(run_dir, RESULTS))
            if rec.get("settings") == tag}


def try_claim(run_dir: str, name: str, tag: str, stale_after: float) -> bool:
    folder = os.path.join(run_dir, CLAIMS)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.{tag}.claim")
    try:
        if os.path.isfile(path) and time.time() - os.path.getmtime(path) > stale_after:
            os.rename(path, f"{path}.stale-{uuid.uuid4().hex[:8]}")  # only one evaluator wins this
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, fh)
    if name in evaluated(run_dir, tag):  # finished by an evaluator whose claim went stale
        return False
    return True


def release_claim(run_dir: str, name: str, tag: str) -> None:
    try:
        os.remove(os.path.join(run_dir, CLAIMS, f"{name}.{tag}.claim"))
    except FileNotFoundError:
        pass


def append_result(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, RESULTS), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # whole lines even with several evaluators appending
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
        fcntl.flock(fh, fcntl.LOCK_UN)


def log_tensorboard(run_dir: str, record: dict) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    step = record.get("step") or 0
    writer = SummaryWriter(os.path.join(run_dir, "tb"), filename_suffix=".eval")
    for key in ("fid", "is", "kid", "intra_fid", "precision", "recall", "density", "coverage"):
        if isinstance(record.get(key), (int, float)):
            writer.add_scalar(f"eval/{key}", record[key], step)
    writer.close()


def run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return {}
    import yaml
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def data_spec(cfg: dict, run_dir: str) -> str:
    data = cfg.get("data", {})
    backend = data.get("backend", "synthetic")
    if backend == "synthetic":
        return (f"synthetic:{data.get('resolution', 32)}:{data.get('synthetic_size', 50000)}:"
                f"{data.get('synthetic_seed', 0)}")
    if backend == "webdataset" and data.get("path"):
        return data["path"]
    raise UsageError(f"{run_dir}/config.yaml: cannot derive reference data from data.backend={backend!r}; "
                     "give --ref STATS")


def record_pruned(run_dir: str, tag: str, every_steps: int = 0, final_step: int = 0) -> List[str]:
    """Checkpoints the trainer saved and then pruned (``train.keep_ckpts``) before they were evaluated
    with these settings: each gets one ``{"checkpoint", "skipped": ...}`` line in eval.jsonl, so a
    gap in the results is explained instead of silent. Returns their names."""
    log = os.path.join(run_dir, "checkpoints.jsonl")
    if not os.path.isfile(log):
        return []
    saved, pruned = {}, set()
    with open(log) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == "saved":
                saved[rec.get("checkpoint")] = rec.get("step")
            elif rec.get("event") == "pruned":
                pruned.add(rec.get("checkpoint"))
    done = evaluated(run_dir, tag)   # results, errors and earlier "skipped" lines alike
    on_disk = {os.path.basename(p) for p in complete_checkpoints(run_dir)}
    missed = sorted(n for n in pruned if n in saved and n not in done and n not in on_disk
                    and wanted(n, every_steps, final_step))
    for name in missed:
        append_result(run_dir, {"checkpoint": name, "settings": tag, "step": saved[name],
                                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "skipped": "pruned by the trainer (train.keep_ckpts) before it was evaluated"})
        print(f"warning: {name} (step {saved[name]}) was pruned before it could be evaluated; raise "
              f"train.keep_ckpts or evaluate more often", file=sys.stderr, flush=True)
    return missed


def wanted(ckpt: str, every_steps: int, final_step: int) -> bool:
    """``--every-steps S``: only checkpoints whose step is a multiple of S, and the final one."""
    if every_steps <= 0:
        return True
    step = int(os.path.basename(ckpt).rsplit("-", 1)[-1])
    return step % every_steps == 0 or (final_step > 0 and step == final_step)


def next_checkpoint(run_dir: str, tag: str, stale_after: float, every_steps: int = 0,
                    final_step: int = 0) -> Optional[str]:
    done = evaluated(run_dir, tag)
    for ckpt in complete_checkpoints(run_dir):
        name = os.path.basename(ckpt)
        if name not in done and wanted(ckpt, every_steps, final_step) and try_claim(run_dir, name, tag, stale_after):
            return ckpt
    return None


def _main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a training run folder (with checkpoints/ and config.yaml)")
    p.add_argument("--ref", default=None, help="reference statistics; default: computed from config.yaml's data")
    p.add_argument("--ref-num-images", type=int, default=0, help="images for the derived reference (0: all)")
    p.add_argument("--watch", action="store_true", help="keep evaluating new checkpoints as they land")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between polls in --watch mode")
    p.add_argument("--max-idle", type=float, default=0.0, help="--watch: stop after this many idle seconds (0: never)")
    p.add_argument("--every-steps", type=int, default=0,
                   help="only checkpoints whose step is a multiple of this (and --final-step); 0: every checkpoint")
    p.add_argument("--final-step", type=int, default=0,
                   help="--watch: stop once the checkpoint of this step is evaluated (0: no such stop)")
    p.add_argument("--after-trainer", action="store_true",
                   help="--watch --final-step as the trainer's evaluator job (launch/slurm.py): at the end, wait "
                        "for the trainer to exit, then add the results it did not read to metrics.jsonl and "
                        "TensorBoard and update RUN_DIR/best")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="do not write eval/* scalars to RUN_DIR/tb (the trainer's own in-training evaluation "
                        "logs them to its trackers instead)")
    p.add_argument("--stale-after", type=float, default=6 * 3600.0,
                   help="seconds after which a claim without a result is taken over")
    add_eval_args(p)
    args = p.parse_args(argv)
    opts = options_from_args(args)
    if not os.path.isdir(args.run_dir):
        raise MissingInput(f"run folder {args.run_dir!r} does not exist")
    if not os.path.isdir(os.path.join(args.run_dir, "checkpoints")) and not args.watch:
        raise UsageError(f"{args.run_dir!r} is not a run folder (no checkpoints/ in it)")
    dist.init()
    ext = make_extractor(args, need_logits="is" in opts.metrics)
    ref = args.ref
    if ref is None:
        cfg = run_config(args.run_dir)
        source = open_source(data_spec(cfg, args.run_dir))
        ref = compute_reference(source, ext, num_images=args.ref_num_images,
                                per_class="intra_fid" in opts.metrics, keep_features="kid" in opts.metrics,
                                prdc_features=opts.prdc_num if set(opts.metrics) & {"precision", "recall", "density",
                                                                                     "coverage"} else 0,
                                spec=data_spec(cfg, args.run_dir))
    tag = settings_tag(opts, load_stats(ref).cache_key or os.path.abspath(ref), ext.family)
    idle_since = time.time()
    while True:
        if dist.is_main():
            record_pruned(args.run_dir, tag, args.every_steps, args.final_step)
        ckpt = dist.broadcast_object(next_checkpoint(args.run_dir, tag, args.stale_after, args.every_steps,
                                                     args.final_step) if dist.is_main() else None)
        if ckpt is None:
            final_done = args.final_step > 0 and f"ckpt-{args.final_step:09d}" in evaluated(args.run_dir, tag)
            final_done = dist.broadcast_object(final_done if dist.is_main() else None)
            if not args.watch or final_done or (args.max_idle and time.time() - idle_since > args.max_idle):
                break
            time.sleep(args.interval)
            continue
        name = os.path.basename(ckpt)
        try:
            result = evaluate(ckpt, ref, ext, opts)
        except (CheckpointError, NonFiniteSamples) as exc:  # this checkpoint is broken: record it, go on
            result = {"error": str(exc), "ckpt": ckpt}
            dist.print0(f"{name}: {exc}")
        except BaseException:
            if dist.is_main():
                release_claim(args.run_dir, name, tag)
            raise
        if dist.is_main():
            record = {"checkpoint": name, "settings": tag, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
            append_result(args.run_dir, record)
            if "error" not in record and not args.no_tensorboard:
                log_tensorboard(args.run_dir, record)
                print(json.dumps({k: record.get(k) for k in ("checkpoint", "step", "fid", "is", "kid", "intra_fid")
                                  if k in record}), flush=True)
        idle_since = time.time()
    if args.after_trainer and dist.is_main():
        finish_after_trainer(args.run_dir)
    return 0


def finish_after_trainer(run_dir: str, timeout: float = 600.0) -> None:
    """``--watch --final-step`` as its own job (``launch/slurm.py`` with ``train.eval_every``): the
    trainer reads ``eval.jsonl`` while it runs, but the final checkpoint is scored after it has exited.
    Once the trainer's lock on the run folder is free (one writer at a time), take it and do what the
    trainer would have done for the results it never read: ``eval/<metric>`` lines in
    ``metrics.jsonl`` (and TensorBoard) at their checkpoints' steps, and the ``best`` pointer."""
    from trainer.config import Config, set_key
    from trainer.evaluation import InTrainingEval
    from trainer.runfolder import RunFolderBusy, RunLock
    deadline = time.time() + timeout
    while True:
        try:
            lock = RunLock(run_dir).acquire()
            break
        except RunFolderBusy:
            if time.time() > deadline:
                print(f"[eval.batch] the trainer still holds {run_dir}; it reads eval.jsonl itself", flush=True)
                return
            time.sleep(2.0)
    try:
        train = run_config(run_dir).get("train") or {}
        cfg = Config()  # the run's own in-training evaluation settings, over the config's defaults
        for key in ("eval_every", "ckpt_every", "eval_metric"):
            if key in train:
                set_key(cfg, f"train.{key}", train[key])
        tracker = InTrainingEval(cfg, run_dir, enabled=True)
        metrics = os.path.join(run_dir, "metrics.jsonl")
        logged = {int(rec.get("step", -1)) for rec in jsonl_records(metrics) if any(k.startswith("eval/") for k in rec)}
        new = [rec for rec in tracker.poll() if rec["step"] not in logged]
        if new:
            with open(metrics, "a") as fh:
                for rec in new:
                    fh.write(json.dumps({"step": rec["step"], "checkpoint": rec["checkpoint"],
                                         **tracker.scalars(rec)}) + "\n")
            for rec in new:
                log_tensorboard(run_dir, rec)
        if tracker.best:
            print(f"[eval.batch] best {tracker.metric} {tracker.best['value']:.4g} at step "
                  f"{tracker.best['step']} ({run_dir}/best); {len(new)} result(s) added to metrics.jsonl", flush=True)
    finally:
        lock.release()


def main(argv: Optional[List[str]] = None) -> int:
    from eval.errors import cli
    return cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
