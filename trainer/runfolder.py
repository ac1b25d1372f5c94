"""The run folder: one writer, the recorded config, and what a restart may change.

- :class:`RunLock`: one trainer per run folder. Rank 0 holds an exclusive ``flock`` on
  ``RUN_DIR/.trainer.lock`` for the whole run, with the holder's host, PID, start time and command
  written in the file. A second trainer on the same folder (a requeued job while the old one still
  runs, a command started twice) is refused with :class:`RunFolderBusy` naming the holder. The
  kernel drops the lock when its holder dies (SIGKILL included), so a lock can never outlive its
  trainer on a file system with working ``flock``. Where ``flock`` is not supported the file's
  content is the lock: a holder on this host whose process no longer exists is stale and taken over.
- :func:`compare_configs`: a run folder is resumed only with the config it was trained with, except
  for :data:`RERUN_KEYS` (budget, cadence, workers, data location: what a rerun may change). Other
  differences are refused with every key, old -> new, unless the caller allows them explicitly
  (``trainer/main.py --allow-config-change``); the model section can never change.
- :func:`write_config`: ``config.yaml`` (the config now in force) is written only after every
  check has passed, and ``config_history.jsonl`` gets one line per start: time, host, step, what
  changed, and the full config.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any, Dict, Optional, Tuple

from .errors import BadInput

LOCK_FILE = ".trainer.lock"
HISTORY_FILE = "config_history.jsonl"
CONFIG_FILE = "config.yaml"

# Keys a rerun may change without making the run another experiment: the G-step budget, logging /
# sampling / checkpoint cadence, pruning, the progress bar, how to resume, loader workers, where the
# (same) data lives and how it is verified, trackers and in-training evaluation.
RERUN_KEYS = frozenset({
    "train.steps", "train.log_every", "train.sample_every", "train.ckpt_every", "train.keep_ckpts",
    "train.progress", "train.resume", "data.num_workers", "data.path", "data.verify",
    "train.log_with", "train.eval_every", "train.eval_metric", "train.eval_num_samples",
    "train.eval_extractor", "train.eval_ref", "train.eval_device", "train.init_from", "train.init_strict",
    "train.cudnn_benchmark", "train.compile_max_recompiles",
})
IGNORED_KEYS = frozenset({"exp"})     # the experiment's name; its content is compared key by key


class RunFolderBusy(BadInput, RuntimeError):
    """Another trainer holds the run folder."""


class ConfigChanged(BadInput, ValueError):
    """A resume with a config that differs from the run's in keys a rerun may not change."""


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks (tells a reused PID from the original)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _proc_start(pid) in (None, start)


def describe_holder(info: Dict[str, Any]) -> str:
    if not info:
        return "a trainer that left no details"
    return (f"trainer pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}"
            + (f" ({info.get('command')})" if info.get("command") else ""))


class RunLock:
    """Exclusive ownership of a run folder (see the module docstring)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: Optional[int] = None

    def _holder(self) -> Dict[str, Any]:
        try:
            with open(self.path) as fh:
                text = fh.read().strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}

    def _me(self) -> Dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
                "started": _dt.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}

    def acquire(self) -> "RunLock":
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(self._busy_message(self._holder())) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            self._acquire_by_content()  # no flock here: the file's content is the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self._me()) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _acquire_by_content(self) -> None:
        holder = self._holder()
        if holder and not self.is_stale(holder):
            raise RunFolderBusy(self._busy_message(holder))

    @staticmethod
    def is_stale(holder: Dict[str, Any]) -> bool:
        """A holder recorded on this host whose process no longer exists (or is another process
        with a reused PID). Holders on other hosts cannot be checked from here and count as live."""
        if holder.get("host") != socket.gethostname():
            return False
        try:
            pid = int(holder.get("pid"))
        except (TypeError, ValueError):
            return True
        return not _alive(pid, holder.get("start"))

    def _busy_message(self, holder: Dict[str, Any]) -> str:
        return (f"run folder {self.run_dir} is in use by {describe_holder(holder)}; wait for it to finish or "
                f"stop it, or train into another --out")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)   # no holder any more (for the content-lock fallback)
        except OSError:
            pass
        os.close(self._fd)              # drops the flock
        self._fd = None


# ----------------------------------------------------------------------------------------- configs

def read_run_config(run_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    import yaml
    try:
        with open(path) as fh:
            tree = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return None
    return tree if isinstance(tree, dict) else None


def config_of_checkpoint(ckpt: str, meta: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The full config a checkpoint was trained with: recorded in its meta.json (new checkpoints)
    or its run folder's config.yaml (older ones)."""
    if isinstance(meta.get("config"), dict):
        return meta["config"]
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    return read_run_config(run_dir)


# Keys added with a change of the default computation: a config.yaml written before one of them
# existed was trained with the value here, so a resume (or launch.compare's reuse) compares against it
# and names the change instead of silently continuing with another computation.
LEGACY_VALUES = {
    "model.sn_iteration": "uv", "model.sn_warmup": 15, "train.update_order": "d_first", "optim.adam": "torch",
}


def config_diff(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every key whose value differs; a key missing on one side (added
    or removed by a code change since the run started) is not compared, except those of
    ``LEGACY_VALUES``, whose absence means the computation before they existed."""
    from .config import flatten
    a, b = flatten(old), flatten(new)
    out = {}
    for key in sorted(set(a) | set(b)):
        if key in IGNORED_KEYS:
            continue
        if key not in a and key in LEGACY_VALUES:
            a[key] = LEGACY_VALUES[key]   # the value the code had before the key existed
        if key not in a or key not in b:
            continue  # a key added or removed by a code change: nothing to compare
        if a[key] != b[key]:
            out[key] = (a[key], b[key])
    return out


def compare_configs(old: Optional[Dict[str, Any]], new: Dict[str, Any], source: str,
                    allow_change: bool) -> Dict[str, Tuple[Any, Any]]:
    """The differences a restart brings; raises :class:`ConfigChanged` for forbidden ones."""
    if old is None:
        return {}
    diff = config_diff(old, new)
    model = {k: v for k, v in diff.items() if k.startswith("model.")}
    other = {k: v for k, v in diff.items() if not k.startswith("model.") and k not in RERUN_KEYS}
    fmt = lambda d: ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in d.items())  # noqa: E731
    if model:
        raise ConfigChanged(f"{source} was trained with another model ({fmt(model)}); its weights cannot "
                            f"be loaded into this one. Use another --out, or train.resume=none to start over")
    if other and not allow_change:
        raise ConfigChanged(f"{source} was trained with another config ({fmt(other)}); resuming would mix "
                            f"two experiments in one run. Restore those values, pass --allow-config-change "
                            f"to continue with the new ones (recorded in {HISTORY_FILE}), or use another --out")
    return diff


def write_config(run_dir: str, cfg_dict: Dict[str, Any], text: str, record: Dict[str, Any]) -> None:
    """``config.yaml`` (atomically) and one line of ``config_history.jsonl``."""
    path = os.path.join(run_dir, CONFIG_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    line = {"time": _dt.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
            "pid": os.getpid(), **record, "config": cfg_dict}
    with open(os.path.join(run_dir, HISTORY_FILE), "a") as fh:
        fh.write(json.dumps(line, default=str) + "\n")
