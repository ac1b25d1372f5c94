"""The manifest written next to the shards, and resolving ``data.path`` to shards for the loaders.

``manifest.json`` (one per output folder)::

    {"manifest_version": 1, "format": "webdataset" | "ffcv",
     "num_samples": N, "num_classes": K,
     "classes": [{"index": 0, "id": "n01440764", "name": "tench", "source_index": 0}, ...],
     "resolution": 128 | null (originals kept), "jpeg_quality": 95,
     "samples_per_shard": 1000, "shuffle_seed": 0,
     "source": {"kind": "imagenet", "path": "...", "split": "train", ...},
     "shards": [{"name": "shard-000000.tar", "samples": 1000, "bytes": ..., "sha256": "...",
                 "index": "shard-000000.tar.idx.npy"}, ...],
     "beton": {"name": "data.beton", "samples": N, "bytes": ..., "sha256": "..."},   # ffcv only
     "skipped": {"count": 2, "items": [{"source": ".../bad.JPEG", "error": "OSError: ..."}]},
     "min_size": {"side": 256, "dropped": 1, "items": [{"source": "...", "size": "250x188"}]},  # prepare --min-size
     "keys": "...", "job": {"id": "...", "spec": {...}}, "writer": {"seconds": ..., ...}}
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .tario import atomic_write, count_records
from .errors import DataInputError, DataMissing

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write(Path(folder) / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    with open(p) as f:
        manifest = json.load(f)
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise DataInputError(f"{str(p)!r} has manifest_version {manifest.get('manifest_version')!r}, "
                         f"this code reads {MANIFEST_VERSION}")
    return manifest


@dataclass
class ShardSet:
    paths: List[str]             # local files, or URLs / pipe: commands when ``remote``
    counts: List[int]            # samples per shard (from the manifest, or counted)
    num_classes: int
    resolution: Optional[int]    # None: images of varying size (originals kept)
    manifest: Optional[dict]
    remote: bool = False         # streamed through webdataset.gopen (see data_pipelines.remote)


def _expand(pattern: str) -> List[str]:
    from braceexpand import braceexpand  # a dependency of webdataset
    paths: List[str] = []
    for part in braceexpand(pattern):
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        paths.extend(matches)
    return paths


def resolve_shards(path: str, *, remote: bool = False, announce: bool = True) -> ShardSet:
    """``data.path`` -> shards: a folder with manifest.json, the manifest itself, a brace pattern
    (``/data/shard-{000000..001281}.tar``) or a glob. Without a manifest the shards are counted.

    ``remote=True`` (the streaming loader) also takes what webdataset opens: brace-expanded URLs
    (``https://host/shard-{000000..001023}.tar``), ``pipe:`` commands and a manifest's URL (see
    :mod:`data_pipelines.remote`; ``announce`` logs that they are being counted). Tools that need
    random access to local files keep the default, which treats such a path as a missing file.
    """
    if not path:
        raise DataInputError("data.path is empty; set it to a folder written by `python -m data_pipelines.prepare`")
    if remote:
        from .remote import is_remote, resolve_remote
        if is_remote(path):
            return resolve_remote(path, announce=announce)
    p = Path(path).expanduser()
    manifest_file = p / MANIFEST_NAME if p.is_dir() else (p if p.name == MANIFEST_NAME else None)
    if manifest_file is not None and manifest_file.is_file():
        m = read_manifest(manifest_file)
        if m.get("format") != "webdataset":
            raise DataInputError(f"{str(manifest_file)!r} describes a {m.get('format')!r} dataset; "
                             f"use data.backend={m.get('format')} or write shards with --format webdataset")
        folder = manifest_file.parent
        paths = [str(folder / s["name"]) for s in m["shards"]]
        missing = [q for q in paths if not os.path.isfile(q)]
        if missing:
            raise DataMissing(f"{len(missing)} shards listed in {str(manifest_file)!r} are missing, "
                                    f"e.g. {missing[0]!r}")
        return ShardSet(paths, [int(s["samples"]) for s in m["shards"]], int(m["num_classes"]),
                        m.get("resolution"), m)
    if p.is_dir():
        paths = sorted(str(q) for q in p.glob("*.tar"))
        if not paths:
            raise DataMissing(f"data.path {path!r} has neither {MANIFEST_NAME} nor *.tar shards")
    else:
        paths = _expand(str(p))
        missing = [q for q in paths if not os.path.isfile(q)]
        if not paths or missing:
            raise DataMissing(f"data.path {path!r} matches no shard files"
                                    + (f" ({missing[0]!r} is missing)" if missing else ""))
    counts, max_label = [], -1
    for q in paths:  # reads every shard once; fine for the small sets that come without a manifest
        n, labels = count_records(q)
        counts.append(n)
        max_label = max([max_label, *labels])
    return ShardSet(paths, counts, max_label + 1, None, None)
