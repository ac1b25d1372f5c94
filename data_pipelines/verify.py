"""Check a prepared dataset against its manifest: ``python -m data_pipelines.verify OUT``.

Two levels, shared by this command and the trainer's ``data.verify`` key:

- ``quick`` (the trainer's default; one ``stat`` and one read of at most 64 KiB per shard): the file
  exists, has the manifest's byte count, its first 64 KiB have the manifest's ``head_sha256``
  (manifests written before that field existed skip this part) and it starts with an intact tar
  header. This catches missing, truncated, zero-byte and overwritten shards, and a shard replaced by
  a copy of another one (its first record, and so its header hash, differs).
- ``full``: the sha256 of every byte against the manifest's ``sha256``, in parallel processes with a
  progress bar (minutes for ImageNet's 150 GB at disk speed).

The command exits 0 when every file matches and 2 (bad input) otherwise, listing each bad file
with its fault. The trainer refuses to start on a mismatch (exit 2) unless ``data.verify=off``, in
which case damaged samples are skipped and counted while training.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .manifest import MANIFEST_NAME, read_manifest
from .tario import BLOCK, HEAD_BYTES, header_ok, sha256_file
from .errors import DataInputError

LEVELS = ("quick", "full")


class DataVerifyError(DataInputError):
    """Files that do not match their manifest; the message lists them with the remedy."""


def _entries(folder: Path, manifest: dict) -> List[dict]:
    if manifest.get("format") == "ffcv":
        return [dict(manifest["beton"], kind="beton")]
    return [dict(s, kind="shard") for s in manifest.get("shards", [])]


def check_quick(path: Path, entry: dict) -> Optional[str]:
    """The fault of one file at the quick level, or None."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if entry.get("bytes") is not None and size != int(entry["bytes"]):
        return f"has {size} bytes, the manifest says {entry['bytes']} (truncated, overwritten or another file)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError as exc:
        return f"unreadable ({exc})"
    if entry.get("head_sha256") and hashlib.sha256(head).hexdigest() != entry["head_sha256"]:
        return "its first bytes differ from the manifest's (another shard's copy, or overwritten)"
    if entry.get("kind") == "shard" and int(entry.get("samples", 1)) > 0 and not header_ok(head[:BLOCK]):
        return "does not start with an intact tar header (overwritten or not a tar file)"
    return None


def check_full(path: Path, entry: dict) -> Optional[str]:
    fault = check_quick(path, entry)
    if fault is not None:
        return fault
    if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        return "sha256 differs from the manifest's (damaged or replaced)"
    return None


def _check_one(args: Tuple[str, dict, str]) -> Tuple[str, Optional[str]]:
    path, entry, level = args
    return path, (check_full if level == "full" else check_quick)(Path(path), entry)


def verify_folder(folder: str | Path, level: str = "full", workers: int = 0,
                  progress: bool = False) -> Tuple[int, List[Tuple[str, str]]]:
    """(files checked, [(path, fault), ...]) for a folder written by ``data_pipelines.prepare``."""
    if level not in LEVELS:
        raise DataInputError(f"verify level {level!r} is not one of {', '.join(LEVELS)}")
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME if folder.is_dir() else folder
    if not manifest_path.is_file():
        raise DataVerifyError(f"{str(folder)!r} has no {MANIFEST_NAME}; only folders written by "
                              f"`python -m data_pipelines.prepare` can be verified")
    manifest = read_manifest(manifest_path)
    tasks = [(str(manifest_path.parent / e["name"]), e, level) for e in _entries(manifest_path.parent, manifest)]
    from tqdm import tqdm
    bar = tqdm(total=len(tasks), unit="file", desc=f"verify ({level})", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    faults = []
    try:
        if workers > 1 and len(tasks) > 1:
            with mp.get_context("fork").Pool(workers) as pool:
                for path, fault in pool.imap_unordered(_check_one, tasks, chunksize=4):
                    bar.update(1)
                    if fault:
                        faults.append((path, fault))
        else:
            for task in tasks:
                path, fault = _check_one(task)
                bar.update(1)
                if fault:
                    faults.append((path, fault))
    finally:
        bar.close()
    return len(tasks), sorted(faults)


def describe(faults: Sequence[Tuple[str, str]], total: int, limit: int = 5) -> str:
    shown = "; ".join(f"{os.path.basename(p)} {f}" for p, f in faults[:limit])
    more = f" (and {len(faults) - limit} more)" if len(faults) > limit else ""
    return f"{len(faults)} of {total} data files do not match their manifest: {shown}{more}"


def check_training_data(cfg) -> None:
    """The trainer's check (``data.verify``) of ``cfg`` (a DataConfig); raises DataVerifyError."""
    if cfg.verify == "off" or cfg.backend not in ("webdataset", "ffcv") or not cfg.path:
        return
    from .remote import is_remote
    if is_remote(cfg.path):
        return  # URLs and pipe: commands stream; the loader says on rank 0 that they are not verified
    p = Path(cfg.path).expanduser()
    folder = p if p.is_dir() else p.parent
    if not (folder / MANIFEST_NAME).is_file():
        return  # shards without a manifest (a glob of third-party tars): nothing to check against
    total, faults = verify_folder(folder, cfg.verify, workers=min(8, os.cpu_count() or 1) if cfg.verify == "full" else 0,
                                  progress=cfg.verify == "full")
    if faults:
        raise DataVerifyError(describe(faults, total) + f". Restore the files or prepare the data again "
                              f"(python -m data_pipelines.verify {folder} lists them all), or set data.verify=off "
                              f"to train anyway (damaged samples are then skipped and counted)")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.verify",
                                description="Check WebDataset shards or an FFCV .beton against the manifest.json "
                                            "written by data_pipelines.prepare.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", help="output folder of data_pipelines.prepare (holding manifest.json)")
    p.add_argument("--level", default="full", choices=LEVELS,
                   help="full: sha256 of every byte; quick: sizes, header hashes and tar headers only")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        total, faults = verify_folder(args.folder, args.level, args.workers, progress=not args.quiet)
    except (DataVerifyError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, fault in faults:
        print(f"BAD {path}: {fault}")
    if faults:
        print(f"error: {describe(faults, total)}", file=sys.stderr)
        return 2
    print(f"ok: {total} file(s) match {Path(args.folder) / MANIFEST_NAME} ({args.level})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
