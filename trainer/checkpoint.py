"""Sharded, atomic, verified training checkpoints.

Layout of one checkpoint, ``RUN_DIR/checkpoints/ckpt-<step:09d>/``:

- ``state/``                 torch.distributed.checkpoint (DCP) files: every rank writes its part
                             (replicated DDP state is de-duplicated by DCP's planner, so in practice
                             rank 0 writes the weights and each rank adds its own RNG/data position);
- ``generator.safetensors``  G and G_ema + model spec, for sampling/evaluation without the trainer;
- ``meta.json``              written last: step, images seen, world size, the full config and the
                             sha256 of every other file.

A checkpoint is written into ``ckpt-<step>.partial/`` and renamed only after ``meta.json`` is on
disk, so a crash while saving never leaves a directory that looks complete. A failed write (full
disk, quota, I/O error) removes the partial folder, leaves the previous checkpoints as they were
and raises :class:`CheckpointWriteError` on every rank. ``RUN_DIR/checkpoints.jsonl`` records each
save and each pruning (``eval.batch --watch`` reads it to report checkpoints pruned before it got
to them).

Loading verifies every checksum first and reports a truncated or corrupt file by name;
``resume=auto`` falls back to the previous checkpoint, and refuses (instead of starting over) when
checkpoints exist but none verifies. DCP reshards on load, so a checkpoint saved by N ranks loads
on M ranks (per-rank RNG streams are exact only when N == M). Loading never unpickles code: DCP's
metadata is read by a restricted unpickler and byte entries with ``weights_only=True``
(:mod:`trainer.safe_dcp`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.distributed.checkpoint as dcp

from data_pipelines.tario import sha256_file

from . import dist
from .errors import BadInput, StorageFailure
from .safe_dcp import CheckpointException, SafeFileSystemReader, UnsafeCheckpoint, WeightsOnlyLoadPlanner, unwrap

PREFIX = "ckpt-"
META = "meta.json"
HISTORY = "checkpoints.jsonl"   # in the run folder, beside checkpoints/
FORMAT = "sngan-checkpoint/1"


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint that is incomplete, corrupt, unsafe or belongs to another model (exit 2)."""


class CheckpointWriteError(StorageFailure, RuntimeError):
    """A checkpoint could not be written (full disk, quota, I/O error); earlier ones are intact."""


def ckpt_dir(root: str, step: int) -> str:
    return os.path.join(root, f"{PREFIX}{step:09d}")


def _files(root: str) -> List[str]:
    out = []
    for base, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(base, n), root) for n in names]
    return sorted(out)


def list_checkpoints(root: str) -> List[str]:
    """Complete checkpoint folders (those with meta.json), oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root)
                   if n.startswith(PREFIX) and not n.endswith(".partial")
                   and os.path.isfile(os.path.join(root, n, META)))
    return [os.path.join(root, n) for n in names]


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint folder (it does not exist or is a file); "
                              f"checkpoints are RUN_DIR/checkpoints/{PREFIX}<step>/")
    if not os.path.isfile(meta_path):
        if path.rstrip("/").endswith(".partial") or os.path.isdir(os.path.join(path, "state")):
            raise CheckpointError(f"{path}: no {META}; the checkpoint is incomplete (a save was interrupted)")
        hint = ""
        found = list_checkpoints(os.path.join(path, "checkpoints"))
        if found:
            hint = f"; it is a run folder, whose newest checkpoint is {found[-1]}"
        raise CheckpointError(f"{path}: not a checkpoint folder (no {META}, no state/){hint}")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: format {got!r} is not {FORMAT!r}")
    return meta


def verify(path: str) -> dict:
    """Check every file against the sha256 in meta.json; return the meta or raise CheckpointError."""
    meta = read_meta(path)
    if not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{os.path.join(path, META)}: has no table of file checksums")
    for rel, digest in meta["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{path}: file {rel} is missing")
        if sha256_file(full) != digest:
            raise CheckpointError(f"{path}: file {rel} is corrupt or truncated (sha256 mismatch)")
    return meta


# ----------------------------------------------------------------------------------------- saving

def storage_reason(exc: BaseException, where: str) -> str:
    """A one-line reason for a failed write, naming a full disk where that is the cause."""
    inner = unwrap(exc)
    seen, chain = set(), []
    e: Optional[BaseException] = inner
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        if isinstance(e, OSError) and e.errno is not None:
            return f"{os.strerror(e.errno).lower()} ({type(e).__name__})"
    text = " ".join(str(e) for e in chain)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if "No space left" in text or ("unexpected pos" in text and free is not None and free < (64 << 20)):
        return "no space left on device"
    first = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    return f"{type(inner).__name__}: {first}"[:300]


def _free_text(path: str) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def _append_history(root: str, record: dict) -> None:
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(root)), HISTORY), "a") as fh:
            fh.write(json.dumps({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    except OSError:
        pass  # a log line is not worth failing a saved checkpoint for


def save(root: str, step: int, state: Dict, rank_state: Dict, meta: Dict,
         export: Callable[[str], None], keep: int, protect: Sequence[str] = ()) -> str:
    """Collective: every rank calls it. Returns the final checkpoint path.

    Raises :class:`CheckpointWriteError` on every rank when any part of the write fails; the
    partial folder is removed and the checkpoints written before stay valid. ``protect`` lists
    checkpoint folders that pruning (``keep``) never removes (e.g. the best one).
    """
    final = ckpt_dir(root, step)
    partial = final + ".partial"

    def fail(local: Optional[str]) -> None:
        message = dist.first_error(local)
        if message is None:
            return
        if dist.is_main():
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        previous = [p for p in list_checkpoints(root) if p != final]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {final}: {message} ({_free_text(root)}); "
                                   f"the partial write was removed and {kept}")

    local = None
    if dist.is_main():
        try:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        except OSError as exc:
            local = storage_reason(exc, root)
    fail(local)
    local = None
    try:
        with warnings.catch_warnings():  # single process: DCP warns that it saves without a process group
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"state": state, f"rank{dist.rank()}": rank_state},
                     storage_writer=dcp.FileSystemWriter(os.path.join(partial, "state")))
    except (Exception, CheckpointException) as exc:
        local = storage_reason(exc, root)
    fail(local)
    local = None
    if dist.is_main():
        try:
            export(os.path.join(partial, "generator.safetensors"))
            files = {rel: sha256_file(os.path.join(partial, rel)) for rel in _files(partial)}
            record = {"format": FORMAT, **meta, "step": step, "world_size": dist.world_size(), "files": files}
            tmp = os.path.join(partial, META + ".tmp")
            with open(tmp, "w") as fh:
                json.dump(record, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, os.path.join(partial, META))
            if os.path.exists(final):          # re-saving the same step (e.g. after a resume)
                shutil.rmtree(final)
            os.replace(partial, final)
        except (Exception, CheckpointException) as exc:
            local = storage_reason(exc, root)
    fail(local)
    if dist.is_main():
        _append_history(root, {"event": "saved", "checkpoint": os.path.basename(final), "step": step})
        keep_safe = {os.path.abspath(p) for p in protect}
        complete = list_checkpoints(root)
        for old in complete[:-keep] if keep > 0 else []:
            if os.path.abspath(old) in keep_safe:
                continue
            shutil.rmtree(old, ignore_errors=True)
            _append_history(root, {"event": "pruned", "checkpoint": os.path.basename(old),
                                   "step": int(os.path.basename(old)[len(PREFIX):])})
    dist.barrier()
    return final


# ----------------------------------------------------------------------------------------- loading

def find_resume(root: str) -> Tuple[Optional[str], List[str]]:
    """(newest checkpoint that verifies or None, the faults of newer ones that did not).

    Raises :class:`CheckpointError` listing every checkpoint and its fault when checkpoints exist
    but none verifies: starting over would silently overwrite them (``train.resume=none`` does
    that on purpose).
    """
    faults = []
    found = list_checkpoints(root)
    for path in reversed(found):
        try:
            verify(path)
            return path, faults
        except CheckpointError as exc:
            faults.append(str(exc))
    if found:
        raise CheckpointError(f"none of the {len(found)} checkpoints in {root} can be resumed: "
                              + "; ".join(faults) + ". Restore them, or pass train.resume=none to start "
                              "over (which overwrites them)")
    return None, faults


def _reader(path: str) -> SafeFileSystemReader:
    return SafeFileSystemReader(os.path.join(path, "state"))


def _dcp_load(path: str, request: Dict, reader: SafeFileSystemReader, what: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(request, storage_reader=reader, planner=WeightsOnlyLoadPlanner())
    except (Exception, CheckpointException) as exc:  # DCP wraps per-rank failures; name the path
        inner = unwrap(exc)
        if isinstance(inner, UnsafeCheckpoint):
            raise CheckpointError(str(inner)) from None
        first = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
        raise CheckpointError(f"{path}: cannot be loaded into {what} ({type(inner).__name__}: {first})") from None


def saved_keys(path: str) -> List[str]:
    """Flattened keys stored in a checkpoint's DCP state (metadata read safely)."""
    try:
        return list(_reader(path).read_metadata().state_dict_metadata.keys())
    except UnsafeCheckpoint as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: state/.metadata unreadable ({exc})") from None


def load(path: str, state: Dict, rank_state: Dict, verified: bool = False) -> dict:
    """Verify (unless the caller just did), then load in place into ``state`` (shared) and
    ``rank_state`` (this rank's part).

    Returns the checkpoint's meta plus ``"rank_state_loaded"`` (False when the checkpoint has no
    stream for this rank, e.g. after growing the world size).
    """
    error = None
    if dist.is_main() and not verified:
        try:
            verify(path)
        except CheckpointError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)
    if error:
        raise CheckpointError(error)
    meta = read_meta(path)
    mine = f"rank{dist.rank()}"
    has_rank = any(k.startswith(mine + ".") for k in saved_keys(path))
    request = {"state": state, **({mine: rank_state} if has_rank else {})}
    _dcp_load(path, request, _reader(path), "this model")
    meta["rank_state_loaded"] = has_rank
    return meta


def load_modules(path: str, modules: Dict[str, "torch.nn.Module"]) -> dict:  # noqa: F821
    """Load only some modules' weights (e.g. ``{"D": D}``) from a training checkpoint, verified.

    For analysis tools that need more than the exported generator (D's weights, say).
    """
    meta = verify(path)
    request = {"state": {name: m.state_dict() for name, m in modules.items()}}
    _dcp_load(path, request, _reader(path), ", ".join(modules))
    return meta
