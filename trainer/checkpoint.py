"""Sharded, atomic, verified training checkpoints.

Layout of one checkpoint, ``RUN_DIR/checkpoints/ckpt-<step:09d>/``:

- ``state/``                 torch.distributed.checkpoint (DCP) files: every rank writes its part
                             (replicated DDP state is de-duplicated by DCP's planner, so in practice
                             rank 0 writes the weights and each rank adds its own RNG/data position);
- ``generator.safetensors``  G and G_ema + model spec, for sampling/evaluation without the trainer;
- ``meta.json``              written last: step, images seen, world size, model config and the
                             sha256 of every other file.

A checkpoint is written into ``ckpt-<step>.partial/`` and renamed only after ``meta.json`` is on
disk, so a crash while saving never leaves a directory that looks complete. Loading verifies every
checksum first and reports a truncated or corrupt file by name; ``resume=auto`` then falls back to
the previous checkpoint. DCP reshards on load, so a checkpoint saved by N ranks loads on M ranks
(per-rank RNG streams are exact only when N == M; ranks without a saved stream start fresh ones).
Loading never unpickles code: byte entries are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from . import dist

PREFIX = "ckpt-"
META = "meta.json"
FORMAT = "sngan-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt or belongs to another model."""


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles byte entries with weights_only=False; we never do."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def ckpt_dir(root: str, step: int) -> str:
    return os.path.join(root, f"{PREFIX}{step:09d}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path}: no {META}; the checkpoint is incomplete (a save was interrupted)")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def verify(path: str) -> dict:
    """Check every file against the sha256 in meta.json; return the meta or raise CheckpointError."""
    meta = read_meta(path)
    for rel, digest in meta["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{path}: file {rel} is missing")
        if _sha256(full) != digest:
            raise CheckpointError(f"{path}: file {rel} is corrupt or truncated (sha256 mismatch)")
    return meta


def save(root: str, step: int, state: Dict, rank_state: Dict, meta: Dict,
         export: Callable[[str], None], keep: int) -> str:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    final = ckpt_dir(root, step)
    partial = final + ".partial"
    if dist.is_main():
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    with warnings.catch_warnings():  # single process: DCP warns that it saves without a process group
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"state": state, f"rank{dist.rank()}": rank_state},
                 storage_writer=dcp.FileSystemWriter(os.path.join(partial, "state")))
    dist.barrier()
    if dist.is_main():
        export(os.path.join(partial, "generator.safetensors"))
        files = {rel: _sha256(os.path.join(partial, rel)) for rel in _files(partial)}
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
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def find_resume(root: str) -> Optional[str]:
    """Newest checkpoint that verifies; broken ones are reported by name and skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint: {exc}", stacklevel=2)
    return None


def load(path: str, state: Dict, rank_state: Dict) -> dict:
    """Verify, then load in place into ``state`` (shared) and ``rank_state`` (this rank's part).

    Returns the checkpoint's meta plus ``"rank_state_loaded"`` (False when the checkpoint has no
    stream for this rank, e.g. after growing the world size).
    """
    error = None
    if dist.is_main():
        try:
            verify(path)
        except CheckpointError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)
    if error:
        raise CheckpointError(error)
    meta = read_meta(path)
    reader = dcp.FileSystemReader(os.path.join(path, "state"))
    saved_keys = reader.read_metadata().state_dict_metadata.keys()
    mine = f"rank{dist.rank()}"
    has_rank = any(k.startswith(mine + ".") for k in saved_keys)
    request = {"state": state, **({mine: rank_state} if has_rank else {})}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(request, storage_reader=reader, planner=_WeightsOnlyLoadPlanner())
    except Exception as exc:  # DCP wraps per-rank failures; surface them with the path
        raise CheckpointError(f"{path}: cannot be loaded into this model ({exc})") from exc
    meta["rank_state_loaded"] = has_rank
    return meta


def load_modules(path: str, modules: Dict[str, "torch.nn.Module"]) -> dict:
    """Load only some modules' weights (e.g. ``{"D": D}``) from a training checkpoint, verified.

    For analysis tools that need more than the exported generator (D's weights, say).
    """
    meta = verify(path)
    request = {"state": {name: m.state_dict() for name, m in modules.items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(request, storage_reader=dcp.FileSystemReader(os.path.join(path, "state")),
                 planner=_WeightsOnlyLoadPlanner())
    return meta
