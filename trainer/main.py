"""Training entry point.

    accelerate launch trainer/main.py                      # the embedded `default` experiment
    python trainer/main.py --exp cifar10_sngan_hinge_resnet data.path=... train.precision=bf16
    torchrun --nproc_per_node 2 trainer/main.py ...

``main(argv)`` returns the process exit status: 0 when training reached ``train.steps``,
``EXIT_PREEMPTED`` (75) when a SIGTERM/SIGUSR2 made it write a checkpoint and stop (run the same
command again to continue: ``train.resume=auto`` is the default), 1 on divergence (NaN), 2 on a
configuration or input error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
import sys

if __package__ in (None, ""):  # run as a script path: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import ConfigError, available_experiments, dump, load_config  # noqa: E402
from trainer.loop import EXIT_OK, EXIT_PREEMPTED, TrainingDiverged  # noqa: E402,F401

EXIT_DIVERGED = 1
EXIT_BAD_INPUT = 2
STOP_SIGNALS = ("SIGTERM", "SIGUSR2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer/main.py",
        description="Train an SN-GAN (Miyato et al. 2018) or a projection cGAN. Dotted key=value "
                    "overrides go after the options, e.g. train.batch_size=32 model.ch=64.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"experiments: {', '.join(available_experiments())}")
    p.add_argument("--exp", default="default", help="experiment name (launch/experiments/NAME.yaml) or a YAML path")
    p.add_argument("--out", default=None, help="run folder (default: runs/<exp>-<timestamp>); "
                                               "an existing run folder is resumed with train.resume=auto")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


class StopFlag:
    """SIGTERM / SIGUSR2 only set a flag; the loop checkpoints at the next step and exits.

    A second signal of the same kind restores the default action and re-raises it (hard stop).
    """

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __call__(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
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
        test, eval.compare) must not keep a handler that ignores SIGTERM, or its forked workers
        inherit it and can no longer be terminated."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name == name:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signal_name = name
        print(f"[trainer] received {name}: will checkpoint and stop after this step", file=sys.stderr, flush=True)


def _run_dir(out, exp: str) -> str:
    from trainer import dist
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", f"{exp}-{stamp}")
    return dist.broadcast_object(os.path.abspath(out))


def train(cfg, out=None, before_run=None):
    """Set up accelerate/DDP, build everything from ``cfg``, train; returns the finished Loop.

    ``loop.status`` is EXIT_OK or EXIT_PREEMPTED. ``before_run(loop)`` is called just before
    training starts (used by tests that inspect what each rank does).
    """
    import torch
    from accelerate import Accelerator

    from trainer import dist
    from trainer.build import build_parts
    from trainer.loop import Loop

    stop = StopFlag()
    stop.install()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    run_dir = _run_dir(out, cfg.exp)
    if dist.is_main():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
            fh.write(dump(cfg))
    dist.print0(f"[trainer] run folder: {run_dir} ({dist.world_size()} process(es) on {accelerator.device})")
    try:
        parts = build_parts(cfg, accelerator.device)
        if cfg.train.compile:
            parts.G.compile()
            parts.D.compile()
        G_ddp = accelerator.prepare_model(parts.G)
        D_ddp = accelerator.prepare_model(parts.D)
        loop = Loop(cfg, parts, G_ddp, D_ddp, accelerator.device, run_dir, stop)
        if before_run is not None:
            before_run(loop)
        loop.status = loop.run()
        if loop.status == EXIT_OK:
            dist.print0(f"[trainer] done: samples in {os.path.join(run_dir, 'samples')}, "
                        f"checkpoints in {os.path.join(run_dir, 'checkpoints')}")
    finally:
        stop.restore()
        if dist.initialized():
            torch.distributed.destroy_process_group()
    return loop


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.exp, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.dry_run:
        print(dump(cfg), end="")
        return EXIT_OK

    from trainer.checkpoint import CheckpointError

    try:
        loop = train(cfg, args.out)
    except TrainingDiverged as exc:
        print(f"[trainer] error: {exc}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"[trainer] error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return loop.status


if __name__ == "__main__":
    sys.exit(main())
