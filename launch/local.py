"""Run a launcher command so that stop signals reach every trainer process and the exit status is theirs.

    python launch/local.py accelerate launch --multi_gpu --num_processes 8 trainer/main.py --exp imagenet128
    python launch/local.py torchrun --nproc_per_node 8 trainer/main.py --exp imagenet128
    python launch/local.py accelerate launch trainer/main.py          # one process

Why: ``accelerate launch`` and ``torchrun`` do not pass a stop signal on as the trainer needs it.
With two processes, SIGTERM to the launcher is forwarded by torchrun's agent, which then exits 1
(and kills workers that take longer than 30 s to checkpoint); SIGUSR2 kills the launcher at once
while the workers train on, orphaned; a Ctrl-C reaches the launcher and the workers both, so the
workers see it twice (the second means "stop now"). With one process ``accelerate launch`` dies on
SIGTERM and leaves the trainer running.

What this does: it starts the command in a process session of its own (so a terminal's Ctrl-C
reaches only this wrapper), and each trainer rank reports its PID and, at the end, its exit status
into a private folder (``$SNGAN_STATUS_DIR``, see ``trainer/main.py``). SIGTERM, SIGUSR2 and SIGINT
are forwarded exactly once to every rank (a rank that has not started yet gets it when it
reports in); each rank writes its part of the checkpoint and exits 75. A second signal of the
same kind is forwarded again, which stops the ranks at once. When the launcher has finished, this
wrapper exits with the ranks' status: 75 when every rank stopped after its checkpoint, 0 when every
rank finished, otherwise the first failing rank's status (1 NaN, 2 bad input, 74 storage), and the
launcher's own status when no rank reported one (e.g. it never started them).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a script path: the repository root on sys.path, not this folder (ARCHITECTURE.md)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from trainer.errors import EXIT_OK, EXIT_PREEMPTED  # the standard library only: no torch here

FORWARDED = ("SIGTERM", "SIGUSR2", "SIGINT")
STATUS_DIR_ENV = "SNGAN_STATUS_DIR"   # the name trainer/main.py reads


def _read(folder: str, kind: str) -> Dict[int, int]:
    out = {}
    for name in os.listdir(folder):
        if name.startswith("rank") and name.endswith("." + kind):
            try:
                with open(os.path.join(folder, name)) as fh:
                    out[int(name[4:-len(kind) - 1])] = int(fh.read().strip())
            except (OSError, ValueError):
                pass
    return out


def combined_status(statuses: Dict[int, int], launcher_rc: int) -> int:
    """The exit status of the whole run from the ranks' own statuses (see the module docstring)."""
    if not statuses:
        return launcher_rc if launcher_rc >= 0 else 128 - launcher_rc
    failing = [statuses[r] for r in sorted(statuses) if statuses[r] not in (EXIT_OK, EXIT_PREEMPTED)]
    if failing:
        return failing[0]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in statuses.values() else EXIT_OK


class Forwarder:
    """Delivers each received stop signal once to every rank that reported its PID."""

    def __init__(self, folder: str):
        self.folder = folder
        self.received: List[int] = []
        self.delivered: Dict[int, int] = {}    # pid -> number of signals delivered

    def __call__(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        again = signum in self.received
        self.received.append(signum)
        what = "again, stopping the ranks at once" if again else "forwarding to every rank; each writes its checkpoint and stops"
        print(f"[launch] {name}: {what}",
              file=sys.stderr, flush=True)
        # Delivered by the polling loop in run(): a handler that delivered itself could interleave
        # with a delivery in progress and send a rank the same signal twice (= stop at once).

    def deliver(self) -> None:
        for pid in _read(self.folder, "pid").values():
            while self.delivered.get(pid, 0) < len(self.received):
                sig = self.received[self.delivered.get(pid, 0)]
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                self.delivered[pid] = self.delivered.get(pid, 0) + 1


def run(command: List[str], poll_s: float = 0.2) -> int:
    if not command:
        print("usage: python launch/local.py LAUNCHER ARGS... (e.g. accelerate launch --multi_gpu "
              "--num_processes 2 trainer/main.py)", file=sys.stderr)
        return 2
    if shutil.which(command[0]) is None and not os.path.isfile(command[0]):
        print(f"error: {command[0]!r} is not a command on PATH", file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp(prefix="sngan-status-")
    forward = Forwarder(folder)
    previous = {}
    try:
        proc = subprocess.Popen(command, env={**os.environ, STATUS_DIR_ENV: folder}, start_new_session=True)
        for name in FORWARDED:
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, forward)
        while proc.poll() is None:
            forward.deliver()   # new signals, and ranks that reported in after a signal arrived
            time.sleep(poll_s)
        statuses = _read(folder, "status")
        pids = _read(folder, "pid")
        code = combined_status(statuses, proc.returncode)
        missing = sorted(set(pids) - set(statuses))
        if missing and statuses:
            print(f"[launch] ranks {missing} reported no exit status (killed?)", file=sys.stderr, flush=True)
            code = code if code not in (0, EXIT_PREEMPTED) else (proc.returncode or 1)
        if statuses and code != proc.returncode:
            what = {0: "finished", EXIT_PREEMPTED: "stopped after writing a checkpoint; run the same command "
                    "again to continue"}.get(code, "failed")
            print(f"[launch] {len(statuses)} rank(s) {what} (exit {code}; the launcher itself exited "
                  f"{proc.returncode})", file=sys.stderr, flush=True)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if args and args[0] == "--":
        args = args[1:]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
