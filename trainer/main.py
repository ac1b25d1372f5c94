"""Training entry point.

    accelerate launch trainer/main.py                      # the embedded `default` experiment
    python trainer/main.py --exp cifar10_sngan_hinge_resnet data.path=... train.precision=bf16
    torchrun --nproc_per_node 2 trainer/main.py ...

``main(argv)`` returns the process exit status (the README's table):

==  ===========================================================================================
0   training reached ``train.steps``
1   a NaN/inf loss (the message names the step; the last good checkpoint is kept), or a bug (its traceback:
    only the declared errors of ``trainer/errors.py`` become one line and their code)
2   bad input: config, data, checkpoint (corrupt, unsafe, another model or config), a run folder
    in use by another trainer, memory too small for the batch; nothing was trained on it
74  the run folder could not be written (full disk, quota, I/O error); earlier checkpoints are intact
75  stopped by SIGTERM / SIGUSR2 / SIGINT after writing a checkpoint: run the same command again
==  ===========================================================================================

A second SIGINT (Ctrl-C) stops at once, without a checkpoint.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
import sys

if __package__ in (None, ""):  # run as a script path: the repository root on sys.path, not this folder (ARCHITECTURE.md)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from trainer.config import ConfigError, available_experiments, dump, load_config, to_dict
from trainer.errors import (  # noqa: F401  (EXIT_*: re-exported for the launchers and tests)
    EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, EXIT_STORAGE, exit_code_of, one_line)
from trainer.loop import TrainingDiverged  # noqa: F401
STOP_SIGNALS = ("SIGTERM", "SIGUSR2", "SIGINT")
STATUS_DIR_ENV = "SNGAN_STATUS_DIR"   # set by launch/local.py: where each rank reports its pid and exit status


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown for the options; the epilog's key listing kept as written."""


def _key_listing() -> str:
    """Every dotted config key with its default, one section per line group."""
    import dataclasses

    from trainer.config import Config
    lines = []
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        if not dataclasses.is_dataclass(value):
            continue
        items = [f"{section.name}.{f.name}={getattr(value, f.name)!r}" for f in dataclasses.fields(value)]
        line = "  "
        for item in items:
            if len(line) + len(item) > 100:
                lines.append(line.rstrip())
                line = "  "
            line += item + "  "
        lines.append(line.rstrip())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer/main.py",
        description="Train an SN-GAN (Miyato et al. 2018) or a projection cGAN. Dotted key=value "
                    "overrides go after the options, e.g. train.batch_size=32 model.ch=64.",
        formatter_class=_HelpFormatter,
        epilog=f"experiments: {', '.join(available_experiments())}\n\nconfig keys and their defaults "
               f"(README 'Training' and trainer/config.py say what each does):\n{_key_listing()}")
    p.add_argument("--exp", default="default", help="experiment name (launch/experiments/NAME.yaml) or a YAML path")
    p.add_argument("--out", default=None, help="run folder (default: runs/<exp>-<timestamp>); "
                                               "an existing run folder is resumed with train.resume=auto")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a run folder although keys other than the rerun keys (steps, intervals, workers, "
                        "data path, ...) differ from its config; the changes are recorded in config_history.jsonl")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


class StopFlag:
    """SIGTERM / SIGUSR2 / SIGINT only set a flag; the loop checkpoints after the current step and exits 75.

    A second signal of the same kind restores the default action and re-raises it (hard stop, e.g. a
    second Ctrl-C). Forked children (data loader workers) inherit the handler and ignore the signal:
    only the training process acts on it, and the workers keep feeding the step in progress.
    """

    def __init__(self):
        self.signal_name = None
        self._previous = {}
        self._pid = os.getpid()

    def __call__(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        self._pid = os.getpid()
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller handles signals
                return

    def restore(self) -> None:
        """Put back the handlers found at install(): a process that called train() in-process (a
        test, launch.compare) must not keep a handler that ignores SIGTERM, or its forked workers
        inherit it and can no longer be terminated.

        After a stop signal the handlers stay: the process is on its way out (exit 75), and a second
        signal during the teardown must still mean "stop now", not a KeyboardInterrupt traceback."""
        if self.signal_name is not None:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked worker: the training process handles it
        name = signal.Signals(signum).name
        if self.signal_name == name:
            print(f"[trainer] second {name}: stopping now, without a checkpoint", file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signal_name = name
        print(f"[trainer] received {name}: will checkpoint and stop after this step"
              + (" (press Ctrl-C again to stop at once)" if name == "SIGINT" else ""), file=sys.stderr, flush=True)


def _env_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def report(kind: str, value) -> None:
    """Tell launch/local.py (when it started us) this rank's pid or exit status."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return
    try:
        path = os.path.join(folder, f"rank{_env_rank()}.{kind}")
        with open(path + ".tmp", "w") as fh:
            fh.write(str(value))
        os.replace(path + ".tmp", path)
    except OSError:
        pass


def resolve_launcher_settings(cfg) -> None:
    """Map accelerate's mixed precision / dynamo settings (``accelerate launch --mixed_precision bf16``,
    ``ACCELERATE_MIXED_PRECISION``, an ``accelerate config`` default) onto ``train.precision`` /
    ``train.compile``, so that one precision is used and the same one recorded; a conflict with an
    explicit ``train.precision`` is refused. The trainer applies autocast itself (the power
    iteration must stay fp32), so accelerate is then told ``mixed_precision="no"``."""
    say = (lambda msg: print(f"[trainer] {msg}", flush=True)) if _env_rank() == 0 else (lambda msg: None)
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
    if mp not in ("no", "bf16", "fp16"):
        raise ConfigError(f"accelerate's mixed_precision={mp!r} is not supported; use bf16 or fp16 "
                          f"(train.precision) or 'no'")
    if mp != "no":
        if cfg.train.precision == "fp32":
            cfg.train.precision = mp
            say(f"accelerate's mixed_precision={mp} (from accelerate launch / ACCELERATE_MIXED_PRECISION) "
                f"-> train.precision={mp}")
        elif cfg.train.precision != mp:
            raise ConfigError(f"train.precision={cfg.train.precision} conflicts with accelerate's "
                              f"mixed_precision={mp} (accelerate launch --mixed_precision, ACCELERATE_MIXED_PRECISION "
                              f"or `accelerate config`); make them agree")
    dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower() or "no"
    if dynamo not in ("no", "none") and not cfg.train.compile:
        cfg.train.compile = True
        say(f"accelerate's dynamo_backend={dynamo} -> train.compile=true (the trainer compiles G and D itself)")


def _run_dir(out, exp: str) -> str:
    from trainer import dist
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", f"{exp}-{stamp}")
    return dist.broadcast_object(os.path.abspath(out))


def _choose_checkpoint(cfg, run_dir: str, allow_change: bool):
    """Rank 0's decision, before anything is built: which checkpoint to resume, and what changed."""
    from trainer import checkpoint, runfolder
    from trainer.loop import ResumePlan
    mode = cfg.train.resume
    if mode == "none":
        return ResumePlan()
    if mode == "auto":
        path, faults = checkpoint.find_resume(os.path.join(run_dir, "checkpoints"))
        for fault in faults:
            print(f"[trainer] warning: skipping checkpoint: {fault}", file=sys.stderr, flush=True)
        if path is None:
            return ResumePlan()
        meta = checkpoint.read_meta(path)
    else:
        path = mode
        meta = checkpoint.verify(path)
    old = runfolder.config_of_checkpoint(path, meta)
    if old is None and isinstance(meta.get("model"), dict):
        old = {"model": meta["model"]}
    changed = runfolder.compare_configs(old, to_dict(cfg), path, allow_change)
    fresh = "optim.name" in changed
    return ResumePlan(path, meta, changed, fresh)


def train(cfg, out=None, before_run=None, allow_config_change: bool = False):
    """Set up accelerate/DDP, build everything from ``cfg``, train; returns the finished Loop.

    ``loop.status`` is EXIT_OK or EXIT_PREEMPTED. ``before_run(loop)`` is called just before
    training starts (used by tests that inspect what each rank does). Order: take the run folder's
    lock, choose and check the checkpoint, build, load, check the data, and only then write
    ``config.yaml`` (a refused start leaves the run folder as it was).
    """
    import torch
    from accelerate import Accelerator

    from trainer import dist, runfolder
    from trainer.build import build_parts, compile_models, set_backend_flags
    from trainer.loop import Loop

    stop = StopFlag()
    stop.install()
    report("pid", os.getpid())
    lock = None
    try:
        resolve_launcher_settings(cfg)
        from accelerate.utils import DistributedDataParallelKwargs
        ddp = DistributedDataParallelKwargs(broadcast_buffers=cfg.train.ddp_broadcast_buffers,
                                            gradient_as_bucket_view=cfg.train.ddp_bucket_view)
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", dynamo_backend="no",
                                  kwargs_handlers=[ddp])
        run_dir = _run_dir(out, cfg.exp)
        error, plan = None, None
        if dist.is_main():
            try:
                lock = runfolder.RunLock(run_dir).acquire()
                plan = _choose_checkpoint(cfg, run_dir, allow_config_change)
            except Exception as exc:  # every rank must leave together: raised below on all of them
                error = exc
        error = dist.broadcast_object(error)
        if error is not None:
            raise error
        plan = dist.broadcast_object(plan)
        dist.print0(f"[trainer] run folder: {run_dir} ({dist.world_size()} process(es) on {accelerator.device})")
        if plan.changed:
            dist.print0("[trainer] config changed since the checkpoint: "
                        + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in plan.changed.items()))
        set_backend_flags(cfg, accelerator.device)
        parts = build_parts(cfg, accelerator.device)
        if cfg.train.compile:
            compile_models(cfg, parts)
        G_ddp = accelerator.prepare_model(parts.G)
        D_ddp = accelerator.prepare_model(parts.D)
        loop = Loop(cfg, parts, G_ddp, D_ddp, accelerator.device, run_dir, stop)
        loop.prepare(plan)
        if dist.is_main():
            runfolder.write_config(run_dir, to_dict(cfg), dump(cfg), {
                "start_step": loop.step, "resumed_from": plan.path, "world_size": dist.world_size(),
                "changed": {k: list(v) for k, v in (plan.changed or {}).items()}, "argv": sys.argv})
        if before_run is not None:
            before_run(loop)
        loop.status = loop.run()
        report("status", loop.status)
        if loop.status == EXIT_OK:
            dist.print0(f"[trainer] done: samples in {os.path.join(run_dir, 'samples')}, "
                        f"checkpoints in {os.path.join(run_dir, 'checkpoints')}")
            if loop.eval_summary:
                dist.print0(loop.eval_summary)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
        dist.shutdown()
    return loop


def _is_oom(exc: BaseException) -> bool:
    import torch
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and ("not enough memory" in str(exc) or "out of memory" in str(exc)))


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.exp, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.dry_run:
        print(dump(cfg), end="")
        return EXIT_OK

    def fail(code: int, exc: BaseException) -> int:
        print(f"[trainer] error: {one_line(exc, first_line=True)}", file=sys.stderr, flush=True)
        report("status", code)
        return code

    try:
        loop = train(cfg, args.out, allow_config_change=args.allow_config_change)
    except Exception as exc:
        if _is_oom(exc):
            t = cfg.train
            return fail(EXIT_BAD_INPUT, RuntimeError(
                f"out of memory with train.batch_size={t.batch_size}, train.g_batch_size="
                f"{t.g_batch_size or t.batch_size} (global) and this model; lower the batch size "
                f"or the model width ({one_line(exc, first_line=True)[:200]})"))
        code = exit_code_of(exc)  # a declared error (trainer.errors) carries its code
        if code is None:
            raise  # anything else is a bug: its traceback, exit 1 (never "bad input")
        return fail(code, exc)
    return loop.status


if __name__ == "__main__":
    sys.exit(main())
