"""Train and score each row of a comparison table: ``python -m launch.compare --suite seeds [--quick]``.

Suites (``--suite``):

- ``seeds``: the seeds' comparison table as its source trains it (pytorch-gan-collections @ 860e90b,
  ``configs/*.txt``): DCGAN, WGAN (weight clipping), WGAN-GP with the CNN and with the ResNet, SN-GAN
  with the Wasserstein loss (CNN, ResNet) and with the hinge loss (ResNet), each with that code's
  architecture, optimizer, batch (G step 2x), update order and pixel transform
  (``launch/experiments/seeds_*.yaml``; ``tests/golden/fixtures/seeds_*.npz`` replay its training
  step through our loop).
- ``paper``: the same seven recipes with the hyperparameters of their original papers
  (``launch/experiments/cifar10_*.yaml``; docs/fidelity.md says where they differ from the above).
- ``normalization``: the SN-GAN paper's normalization comparison on the standard CNN (Sec. 4):
  SN, weight normalization, orthonormal regularization, weight clipping, gradient penalty.
- ``cifar10``: the real-data study (docs/real-data.md): DCGAN, WGAN (clipping), WGAN-GP CNN and ResNet,
  SN-GAN Wasserstein CNN, SN-GAN hinge CNN, SN-GAN hinge ResNet, SN-GAN Wasserstein ResNet, WN CNN,
  orthonormal CNN (the two rows after WGAN-GP CNN were added after the first study: not yet run).

Every row is trained for the same number of G iterations (``--steps``; each row keeps its own
n_dis, as in the papers), then scored: ``--num-samples`` generated images against reference
statistics of the training data, FID always and IS when the extractor has logits. A row **works**
when (1) training finished with finite losses, (2) FID < ``--fid-threshold`` and (3) it has not
collapsed: its recall (improved recall, Kynkäänniemi et al. 2019, k = 3: the fraction of real
images inside the k-NN ball of some generated image) is at least ``--min-recall`` (0.25; see
launch/compare_score.py). The table (markdown) is printed and
written to ``OUT/compare.md`` with the numbers in ``OUT/compare.json``; each row's run folder is
``OUT/<experiment>/`` (a rerun reuses finished runs, so an interrupted comparison continues; a
folder trained with another config is refused). Trailing ``KEY=VALUE`` arguments override the
trainer config of every row, e.g. ``train.seed=1`` to train the table again with another seed.

Full size (GPUs): the experiments' own data (``--data-path``, CIFAR-10 WebDataset shards), their
widths and batch sizes, 50000 samples, Inception features (``--ref``: a stats file from
``python -m eval.reference``; without it the statistics of the data are computed and cached).
Rows train one after another, each with ``--launcher`` (e.g. ``"accelerate launch --multi_gpu
--num_processes 8"``) or in this process. ``--width-scale`` / ``--batch-scale`` shrink every row's
own widths and batches by the same factor (a CPU-sized table on the real data, with Inception, KID
against reference features and a real-data floor from ``--floor-data``: docs/real-data.md).
Scores are cached per row in ``OUT/<experiment>/score-<settings>.json``.

``--quick`` sizes it for a CPU: the embedded shapes10 data at 32 px, unconditional, narrow
models (width 16), batch 32, ``--steps`` 1000 G iterations, rows trained side by side (``--jobs``:
one per core, one thread each; 37 minutes of wall time for the seven rows on an idle 2-core
machine, 50 CPU minutes), 1000 samples, and the ``shapes10-cnn`` extractor
(``eval/shapes_classifier.py``: Inception runs at one to two images per second on a busy 2-core CPU)
with "works" at FID_shapes < 5 (see ``QUICK`` for the calibration). At 200 steps no row works yet.
Quick numbers measure only whether each recipe learns the toy data set in a small budget (one
seed): FID at N=1000 is biased upward (see the "real data" row, two disjoint real sets of N
images) and comparable only within the table, never with published Inception FIDs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script path: the repository root on sys.path, not this folder (ARCHITECTURE.md)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from launch.compare_score import (  # noqa: E402,F401  (Scorer, verdict: part of this module's interface)
    NO_FINAL_CHECKPOINT, TRAINER_RAISED, RowResult, Scorer, checkpoint_step, copy_grids, make_scorer, score_rows,
    table, verdict)
from trainer.errors import EXIT_OK, EXIT_PREEMPTED, Preempted, UsageError, exit_code_of  # noqa: E402


class Interrupted(Preempted, RuntimeError):
    """A row's training was stopped by a signal."""


@dataclass(frozen=True)
class Row:
    name: str
    exp: str


SUITES: Dict[str, List[Row]] = {
    # The seeds' table as pytorch-gan-collections trains it (launch/experiments/seeds_*.yaml).
    "seeds": [
        Row("DCGAN", "seeds_dcgan"),
        Row("WGAN (weight clipping)", "seeds_wgan"),
        Row("WGAN-GP, CNN", "seeds_wgangp_cnn"),
        Row("WGAN-GP, ResNet", "seeds_wgangp_resnet"),
        Row("SN-GAN, Wasserstein, CNN", "seeds_sngan_w_cnn"),
        Row("SN-GAN, Wasserstein, ResNet", "seeds_sngan_w_resnet"),
        Row("SN-GAN, hinge, ResNet", "seeds_sngan_hinge_resnet"),
    ],
    # The same recipes with their papers' settings.
    "paper": [
        Row("DCGAN", "cifar10_dcgan"),
        Row("WGAN (weight clipping)", "cifar10_wgan"),
        Row("WGAN-GP, CNN", "cifar10_wgangp_cnn"),
        Row("WGAN-GP, ResNet", "cifar10_wgangp_resnet"),
        Row("SN-GAN, Wasserstein, CNN", "cifar10_sngan_w_cnn"),
        Row("SN-GAN, Wasserstein, ResNet", "cifar10_sngan_w_resnet"),
        Row("SN-GAN, hinge, ResNet", "cifar10_sngan_hinge_resnet"),
    ],
    # The real-data study (docs/real-data.md): the seeds' recipes plus the paper's normalization
    # baselines on the standard CNN, each with its own published optimizer settings.
    "cifar10": [
        Row("DCGAN", "cifar10_dcgan"),
        Row("WGAN (weight clipping)", "cifar10_wgan"),
        Row("WGAN-GP, CNN", "cifar10_wgangp_cnn"),
        Row("WGAN-GP, ResNet", "cifar10_wgangp_resnet"),           # the seeds' rows the first study left out
        Row("SN-GAN, Wasserstein, CNN", "cifar10_sngan_w_cnn"),
        Row("SN-GAN, hinge, CNN", "cifar10_sngan_hinge_cnn"),
        Row("SN-GAN, hinge, ResNet", "cifar10_sngan_hinge_resnet"),
        Row("SN-GAN, Wasserstein, ResNet", "cifar10_sngan_w_resnet"),
        Row("WN, CNN", "cifar10_wn"),
        Row("orthonormal, CNN", "cifar10_orth"),
    ],
    "normalization": [
        Row("SN (spectral normalization)", "cifar10_sngan_cnn"),
        Row("WN (weight normalization)", "cifar10_wn"),
        Row("orthonormal regularization", "cifar10_orth"),
        Row("weight clipping", "cifar10_wgan"),
        Row("gradient penalty", "cifar10_wgangp_cnn"),
    ],
}

# --quick: every row on the embedded data, unconditional, at a CPU-sized width and batch.
QUICK_DATA = ["data.backend=synthetic", "data.resolution=32", "model.num_classes=0"]
QUICK_WIDTH = {"cnn32": 16, "cnn32code": 16, "dcgan32": 16, "resnet32": 16}
# The quick FID threshold is in shapes10-cnn units (real features have mean variance 1 per dimension).
# Calibration at N=1000 (no GAN involved): two disjoint real sets 0.13; real images with 2 of the 10
# classes missing 2.8, with 5 missing 18.5, one class only 150; an untrained ResNet G 534.
# threads: the quick models' ops are too small to gain from intra-op threads, and on a shared CPU two
# OpenMP threads made a width-16 CNN's D step 20x slower than one (4.0 s vs 0.18 s, measured here).
# jobs: rows train side by side, one process per core, each with one thread.
QUICK = dict(steps=1000, num_samples=1000, batch_size=32, extractor="shapes10-cnn", fid_threshold=5.0, threads=1,
             jobs=max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
FULL = dict(steps=0, num_samples=50000, batch_size=0, extractor="inception", fid_threshold=50.0, threads=0, jobs=1)


def base_widths(cfg) -> tuple:
    """(G width, D width) of an experiment: its g_ch/d_ch/ch, else the architecture's default."""
    import inspect

    from models.registry import _DISCRIMINATORS, _GENERATORS

    def default(table, name):
        return inspect.signature(table[name]).parameters["ch"].default
    m = cfg.model
    return (m.g_ch or m.ch or default(_GENERATORS, m.g), m.d_ch or m.ch or default(_DISCRIMINATORS, m.d))


def row_overrides(exp: str, quick: bool, steps: int, batch_size: int, data_path: Optional[str],
                  width: int = 0, width_scale: float = 0.0, batch_scale: float = 0.0) -> List[str]:
    """The trainer overrides that size one row (``width_scale`` / ``batch_scale`` shrink every row's
    own widths and batch sizes by the same factor, keeping each row's G/D batch ratio)."""
    from trainer.config import load_config
    cfg = load_config(exp)
    out = []
    if quick:
        out += QUICK_DATA
        out += [f"model.g_ch={width or QUICK_WIDTH.get(cfg.model.g, 16)}",
                f"model.d_ch={width or QUICK_WIDTH.get(cfg.model.d, 16)}"]
    elif data_path:
        out.append(f"data.path={data_path}")
    if width_scale and not quick:
        g, d = base_widths(cfg)
        out += [f"model.g_ch={max(1, round(g * width_scale))}", f"model.d_ch={max(1, round(d * width_scale))}"]
    if batch_scale and not batch_size:
        t = cfg.train
        out += [f"train.batch_size={max(1, round(t.batch_size * batch_scale))}",
                f"train.g_batch_size={round(t.g_batch_size * batch_scale) if t.g_batch_size else 0}"]
    if batch_size:
        out += [f"train.batch_size={batch_size}", "train.g_batch_size=0"]
    if steps:
        out.append(f"train.steps={steps}")
    if quick:  # one checkpoint and one sample grid at the end; full runs keep their checkpoint schedule
        steps = steps or cfg.train.steps
        out += [f"train.ckpt_every={steps}", f"train.sample_every={steps}",
                f"train.log_every={max(1, steps // 10)}", "train.keep_ckpts=1", "train.progress=false"]
    return out


def train_command(exp: str, run_dir: str, overrides: Sequence[str], launcher: Optional[str]) -> List[str]:
    """The command line that trains one row in its own process(es)."""
    argv = ["--exp", exp, "--out", run_dir, *overrides]
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    return [*prefix, os.path.join(ROOT, "trainer", "main.py"), *argv]


def start_row(exp: str, run_dir: str, overrides: Sequence[str], launcher: Optional[str]) -> subprocess.Popen:
    """Start training one row in a subprocess (output appended to ``run_dir/train.log``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        return subprocess.Popen(train_command(exp, run_dir, overrides, launcher), stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def train_row(exp: str, run_dir: str, overrides: Sequence[str], launcher: Optional[str]) -> int:
    """Train one row (resuming a partial run); returns the trainer's exit status."""
    if launcher:
        return start_row(exp, run_dir, overrides, launcher).wait()
    from trainer.main import main as train_main
    return train_main(["--exp", exp, "--out", run_dir, *overrides])


# Keys a rerun may change without making a run folder another experiment: the trainer's own list
# (budget, cadence, workers, data location). A smaller budget counts a longer run as finished.
from trainer.runfolder import RERUN_KEYS  # noqa: E402


def check_run_folder(run_dir: str, cfg) -> None:
    """Refuse a run folder trained with another config (e.g. other overrides or --width): reusing or
    continuing it would put another experiment's numbers in this table."""
    import yaml
    from trainer.config import to_dict
    from trainer.runfolder import config_diff
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as fh:
            old = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path} is unreadable ({exc}); remove {run_dir} or use another --out") from exc
    # a key that a later sngan version added (absent from the old config) is not a difference
    diff = {k: v for k, v in config_diff(old, to_dict(cfg)).items() if k not in RERUN_KEYS}
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise UsageError(f"{run_dir} was trained with another config ({shown}); use another --out "
                         "or remove that folder")


def finished_checkpoint(run_dir: str, steps: int) -> Optional[str]:
    """The newest complete checkpoint at ``steps`` or later (a run stopped by a signal just after
    ``steps``, then given a smaller budget, counts as finished at its own step)."""
    from eval.ckpt import complete_checkpoints
    found = [c for c in complete_checkpoints(run_dir) if checkpoint_step(c) >= steps]
    return found[-1] if found else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", default="seeds", choices=sorted(SUITES), help="which table")
    p.add_argument("--quick", action="store_true", help="CPU size: embedded data, narrow models, tiny budget")
    p.add_argument("--jobs", type=int, default=None,
                   help=f"rows trained at once, each in its own process with --threads threads (unset=%(default)s: "
                        f"quick {QUICK['jobs']} (the CPU cores here), full {FULL['jobs']})")
    p.add_argument("--rows", default=None, help="comma-separated experiment names: only these rows")
    p.add_argument("--out", default=None, help="output folder (unset=%(default)s: runs/compare-<suite>[-quick])")
    p.add_argument("--steps", type=int, default=None,
                   help=f"G iterations per row (unset=%(default)s: quick {QUICK['steps']}, "
                        "full: each experiment's own)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"D batch per row (unset=%(default)s: quick {QUICK['batch_size']}, "
                        "full: each experiment's own)")
    p.add_argument("--width", type=int, default=0,
                   help=f"quick mode: base width of G and D (0: per architecture, {QUICK_WIDTH})")
    p.add_argument("--width-scale", type=float, default=0.0,
                   help="full mode: multiply every row's own G and D widths by this (0: as published), e.g. 0.5 "
                        "for a CPU-sized table")
    p.add_argument("--batch-scale", type=float, default=0.0,
                   help="multiply every row's own D and G batch sizes by this (0: as published), keeping each "
                        "row's G/D batch ratio")
    p.add_argument("--floor-data", default=None,
                   help="with --ref: real images (e.g. the training shards) scored like a row, N of them against "
                        "the reference: the floor of FID/KID at this N")
    p.add_argument("--num-samples", type=int, default=None,
                   help=f"samples per row for FID/IS (unset=%(default)s: quick {QUICK['num_samples']}, "
                        f"full {FULL['num_samples']})")
    p.add_argument("--extractor", default=None,
                   help=f"feature extractor (unset=%(default)s: quick {QUICK['extractor']}, full {FULL['extractor']})")
    p.add_argument("--ref", default=None, help="full mode: reference statistics .npz of the training data "
                                               "(unset=%(default)s: computed from the data, cached in --out)")
    p.add_argument("--data-path", default=None, help="full mode: training data shards (unset=%(default)s: each "
                                                     "experiment's data.path)")
    p.add_argument("--fid-threshold", type=float, default=None,
                   help=f"'works' needs FID below this (unset=%(default)s: quick {QUICK['fid_threshold']:g}, "
                        f"full {FULL['fid_threshold']:g})")
    p.add_argument("--min-recall", type=float, default=0.25,
                   help="'works' needs recall (Kynkaanniemi et al. 2019, k=3) at least this (below: collapsed)")
    p.add_argument("--launcher", default=None, help="train each row in a subprocess with this command, e.g. "
                                                   "'accelerate launch --multi_gpu --num_processes 8' "
                                                   "(unset=%(default)s: in this process)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"intra-op CPU threads for training and scoring, 0: torch's default (unset=%(default)s: quick "
                        f"{QUICK['threads']}, full {FULL['threads']})")
    p.add_argument("--score-threads", type=int, default=0,
                   help="intra-op CPU threads while scoring, after all rows trained (0: as --threads)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the scored samples")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="trainer config overrides for every row, applied after the suite's sizing, e.g. "
                        "train.seed=1 for another training seed (a run folder trained with other values is refused)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the real-data row (N more real images against the reference; it is also skipped "
                        "when the data has fewer than 2N images)")
    return p


def resolve_defaults(args) -> None:
    base = QUICK if args.quick else FULL
    for key in ("steps", "batch_size", "num_samples", "extractor", "fid_threshold", "threads", "jobs"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    if args.out is None:
        args.out = os.path.join("runs", f"compare-{args.suite}" + ("-quick" if args.quick else ""))


def select_rows(suite: str, names: Optional[str]) -> List[Row]:
    rows = SUITES[suite]
    if not names:
        return rows
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {r.exp: r for r in rows}
    bad = [n for n in wanted if n not in known]
    if bad:
        raise UsageError(f"--rows {bad} are not in suite {suite!r}; valid: {', '.join(known)}")
    return [known[n] for n in wanted]


def check_data(cfg) -> None:
    """Fail before training anything when a row's shards are missing (full mode)."""
    if cfg.data.backend != "webdataset":
        return
    from data_pipelines.manifest import resolve_shards
    try:
        resolve_shards(cfg.data.path, remote=True)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{cfg.exp}: data.path={cfg.data.path!r} has no readable shards ({exc}); prepare them "
                         "(see the experiment YAML) or pass --data-path") from exc


def train_rows(rows: Sequence[Row], args) -> List[RowResult]:
    """Train every row that has no final checkpoint yet; returns one record per row."""
    from trainer.config import load_config
    configs = []
    for row in rows:
        overrides = row_overrides(row.exp, args.quick, args.steps, args.batch_size, args.data_path, args.width,
                                  args.width_scale, args.batch_scale)
        overrides += args.overrides
        cfg = load_config(row.exp, overrides)
        check_data(cfg)
        check_run_folder(os.path.join(args.out, row.exp), cfg)
        configs.append((row, overrides, cfg))
    results, todo = [], []
    for row, overrides, cfg in configs:
        run_dir = os.path.join(args.out, row.exp)
        os.makedirs(run_dir, exist_ok=True)
        r = RowResult(name=row.name, exp=row.exp, loss=cfg.loss.name, constraint=cfg.model.d_constraint,
                      n_dis=cfg.train.n_dis, steps=cfg.train.steps, run_dir=run_dir, overrides=overrides)
        ckpt = finished_checkpoint(run_dir, cfg.train.steps)
        if ckpt is not None:
            timing = os.path.join(run_dir, "train_seconds.txt")
            r.exit = EXIT_OK
            r.train_seconds = float(open(timing).read()) if os.path.isfile(timing) else None
            print(f"[compare] {row.name}: reusing {ckpt}", flush=True)
        else:
            todo.append(r)
        results.append(r)
    if args.jobs > 1 and len(todo) > 1:
        _train_parallel(todo, args)
    else:
        for r in todo:
            _announce(r)
            t0 = time.time()
            try:
                r.exit = train_row(r.exp, r.run_dir, r.overrides, args.launcher)
            except Exception as exc:  # one broken row must not take the table down
                r.exit, r.error = TRAINER_RAISED, f"{type(exc).__name__}: {exc}"
                print(f"[compare] {r.name} failed: {r.error}", file=sys.stderr, flush=True)
            _finish(r, time.time() - t0)
    interrupted = [r.exp for r in todo if r.exit == EXIT_PREEMPTED]
    if interrupted:  # a stop signal: the trainers checkpointed; the same command continues
        raise Interrupted(f"stopped while training {', '.join(interrupted)} (checkpoints written); run the "
                          "same command again to continue")
    for r in results:
        r.ckpt = finished_checkpoint(r.run_dir, r.steps)
        if r.exit == EXIT_OK and r.ckpt is None:
            r.exit = NO_FINAL_CHECKPOINT
        if r.ckpt is not None:
            r.steps = checkpoint_step(r.ckpt)
    return results


def _announce(r: RowResult) -> None:
    print(f"[compare] training {r.name} ({r.exp}) for {r.steps} G steps -> {r.run_dir}", flush=True)


def _finish(r: RowResult, seconds: float) -> None:
    r.train_seconds = seconds
    with open(os.path.join(r.run_dir, "train_seconds.txt"), "w") as fh:
        fh.write(f"{seconds:.1f}\n")
    if r.exit not in (EXIT_OK, EXIT_PREEMPTED):
        print(f"[compare] {r.name} exited with status {r.exit} (log: {r.run_dir}/train.log)",
              file=sys.stderr, flush=True)


def _train_parallel(todo: List[RowResult], args) -> None:
    """Train up to ``--jobs`` rows at once, each in its own process with ``--threads`` threads."""
    import signal
    pending, running = list(todo), {}
    stop = []

    def forward(signum, _frame):  # the scheduler's stop signal: each trainer checkpoints and exits 75
        stop.append(signum)
        for _, proc, _ in running.values():
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        while pending or running:
            while pending and len(running) < args.jobs and not stop:
                r = pending.pop(0)
                _announce(r)
                running[r.exp] = (r, start_row(r.exp, r.run_dir, r.overrides, args.launcher), time.time())
            time.sleep(0.5)
            for exp, (r, proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    r.exit = proc.returncode
                    _finish(r, time.time() - t0)
                    print(f"[compare] {r.name}: trained in {r.train_seconds:.0f}s (exit {r.exit})", flush=True)
                    del running[exp]
            if stop and not running:
                break
    finally:
        for _r, proc, _ in running.values():  # interrupted here (Ctrl-C, an error): checkpoint and stop
            proc.terminate()
        for r, proc, t0 in running.values():
            r.exit = proc.wait()
            _finish(r, time.time() - t0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for r in pending:  # never started because of a stop signal
        r.exit = EXIT_PREEMPTED


def run(args) -> List[RowResult]:
    from trainer import dist
    rows = select_rows(args.suite, args.rows)
    if args.num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2, got {args.num_samples}")
    for flag in ("steps", "batch_size", "width", "width_scale", "batch_scale"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if not 0 <= args.min_recall <= 1:
        raise UsageError(f"--min-recall must be in [0, 1] (a fraction of the real images), got {args.min_recall}")
    os.makedirs(args.out, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        results = train_rows(rows, args)
        if args.score_threads:
            torch.set_num_threads(args.score_threads)
        scorer, floor = make_scorer(args, rows)
        score_rows(results, scorer, args)
        if callable(floor):
            floor = floor()
        copy_grids(results, args.out)
    finally:
        torch.set_num_threads(threads)  # main() may be called from another program (the tests)
    text = table(results, args, floor)
    grids = [r for r in results if r.grid]
    if grids:
        text += "\n\nLast sample grid of each row (fixed noise, the trainer's own grid at its final step):\n\n"
        text += "\n".join(f"- {r.name}: ![{r.exp}]({r.grid})" for r in grids)
    if dist.is_main():
        with open(os.path.join(args.out, "compare.md"), "w") as fh:
            fh.write(text + "\n")
        with open(os.path.join(args.out, "compare.json"), "w") as fh:
            json.dump({"suite": args.suite, "quick": args.quick, "num_samples": args.num_samples,
                       "extractor": scorer.ext.name, "feature_family": scorer.ext.family,
                       "fid_threshold": args.fid_threshold, "min_recall": args.min_recall,
                       "threads": args.threads, "real_floor": floor, "rows": [r.to_json() for r in results]}, fh, indent=1)
        print(text, flush=True)
    return results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    resolve_defaults(args)
    try:
        run(args)
    except Interrupted as exc:
        print(f"[compare] {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except Exception as exc:
        code = exit_code_of(exc)  # declared bad input (config, extractor, data, statistics, flags)
        if code is None:
            raise  # a bug keeps its traceback (exit 1)
        print(f"error: {exc}", file=sys.stderr)
        return code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
