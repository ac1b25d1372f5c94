"""Source -> WebDataset shards or an FFCV .beton, in parallel, resumable, sliceable, with a manifest.

Order and keys. The items of the source (sorted classes, sorted files) are shuffled once with
``shuffle_seed`` and cut into shards of ``samples_per_shard``, so every shard holds a mix of classes
(ImageNet in folder order would give one-class shards, and a loader's shuffle buffer could not mix
them). A sample's key is its 8-digit index in the *unshuffled* listing, so it names its source file.

Two phases. (1) *Convert*: the listing is cut into blocks of ``samples_per_shard`` consecutive
items (consecutive members of an archive, rows of a parquet file); each block is decoded, filtered
(``min_size``), resized and encoded, and its JPEGs are written to ``.prepare-state/blocks/`` as one
file plus a JSON record (sha256, offsets, labels, skipped and dropped items). (2) *Assemble*: each
shard gathers its shuffled items from the block files; nothing is decoded again. The shard bytes
are the same as converting the shard's items directly.

Resume. The job (source, options) is hashed; ``.prepare-state/job.json`` is written first. Every
file is written to a temporary name, fsynced and renamed, and its record (with the sha256) is
written after it, so a file without a record, or whose sha256 differs from it, is redone; a
half-written file is never accepted. Running again with the same job:

* manifest present -> nothing to do (no-op);
* manifest absent (interrupted) -> every verified block and shard is kept, the rest redone;
* a *different* job over an existing output -> refused unless ``overwrite`` (which first deletes
  only the files this writer makes).

Slices. ``slice_=(k, n)`` converts only the k-th of n contiguous ranges of blocks and stops (one
task of a SLURM array); a run without a slice then finds those blocks verified, converts whatever
is missing and assembles: the result is the same as one process doing everything.

FFCV: the same shards are written to ``.ffcv-staging/`` and then copied into ``data.beton`` without
re-encoding (the JPEG bytes are stored as they are), so both formats hold identical pixels.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from .imaging import TooSmall, UndecodableImage, convert_array, convert_file
from .manifest import MANIFEST_NAME, MANIFEST_VERSION, read_manifest, write_manifest
from .sources import Source
from .tario import HEAD_BYTES, atomic_write, build_shard, index_path, save_index, sha256_bytes, sha256_file

FORMATS = ("webdataset", "ffcv")
STATE_DIR = ".prepare-state"
BLOCK_DIR = "blocks"
STAGING_DIR = ".ffcv-staging"
BETON_NAME = "data.beton"
SHARD_PATTERN = "shard-{:06d}.tar"
BLOCK_PATTERN = "block-{:06d}"
WRITER_VERSION = 1


class PrepareError(RuntimeError):
    """The output folder holds a different job; nothing was changed."""


@dataclass
class PrepareOptions:
    format: str = "webdataset"
    resolution: Optional[int] = None   # None: keep original sizes
    jpeg_quality: int = 95
    samples_per_shard: int = 1000
    workers: int = 0                   # 0: convert in this process
    shuffle_seed: int = 0
    overwrite: bool = False
    progress: bool = True
    min_size: int = 0                  # drop images whose shorter side is below this (0: keep all)
    slice_: Optional[Tuple[int, int]] = None  # (k, n): convert only slice k of n, do not assemble


# The source is handed to forked workers through this global (it holds closures over memmaps,
# which do not pickle); tasks then only carry index lists.
_SOURCE: Optional[Source] = None
_OPTIONS: Optional[PrepareOptions] = None


def _job_spec(source: Source, opts: PrepareOptions) -> dict:
    classes = [c.id for c in source.classes]
    # The per-class counts are a result of the listing, not an option: not part of the job's identity.
    described = {k: v for k, v in source.describe().items() if k != "per_class"}
    return {"writer_version": WRITER_VERSION, "source": described, "num_items": len(source),
            "classes_sha256": hashlib.sha256("\n".join(classes).encode()).hexdigest(),
            "format": opts.format, "resolution": opts.resolution, "jpeg_quality": opts.jpeg_quality,
            "samples_per_shard": opts.samples_per_shard, "shuffle_seed": opts.shuffle_seed,
            "min_size": opts.min_size}


def _job_id(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _our_files(out: Path) -> List[Path]:
    names = [out / MANIFEST_NAME, out / STATE_DIR, out / STAGING_DIR, out / BETON_NAME,
             out / (BETON_NAME + ".partial")]
    names += list(out.glob("shard-*.tar")) + list(out.glob("shard-*.tar.partial"))
    names += list(out.glob("shard-*.tar.idx.npy")) + list(out.glob("shard-*.tar.idx.npy.partial"))
    return [p for p in names if p.exists()]


def _remove(paths: List[Path]) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _check_existing(out: Path, spec: dict, job_id: str, overwrite: bool) -> Optional[dict]:
    """The existing manifest when the same job is complete; raises when a different job is there."""
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            old = read_manifest(manifest_path)
        except (ValueError, OSError):
            old = {}
        if old.get("job", {}).get("id") == job_id and not overwrite:
            return old
        if not overwrite:
            raise PrepareError(f"{str(out)!r} already holds a dataset written with other options "
                               f"(job {old.get('job', {}).get('id')!r}, this is {job_id!r}); "
                               f"pass --overwrite to replace it or choose another output folder")
    job_file = out / STATE_DIR / "job.json"
    if job_file.is_file() and not overwrite:
        old_spec = json.loads(job_file.read_text())
        if old_spec != spec:
            diff = sorted(k for k in set(spec) | set(old_spec) if spec.get(k) != old_spec.get(k))
            raise PrepareError(f"{str(out)!r} holds an unfinished job with different {diff}; pass --overwrite "
                               f"to discard it, or rerun with the same options to finish it")
    if overwrite:
        _remove(_our_files(out))
    elif not job_file.is_file() and list(out.glob("shard-*.tar")):
        raise PrepareError(f"{str(out)!r} holds shard files of unknown origin; pass --overwrite to replace "
                           f"them or choose an empty output folder")
    return None


def _item_name(index: int) -> str:
    src = _SOURCE
    if src.files is not None:
        return src.files[index]
    if src.names is not None:
        return src.names[index]
    return f"{src.kind}:{src.split}#{index}"


def _raw_items(start: int, stop: int) -> Iterator[Tuple[int, object]]:
    """(index, bytes | uint8 array | exception) for items start..stop-1 of the source."""
    src = _SOURCE
    if src.files is not None:
        for i in range(start, stop):
            try:
                with open(src.files[i], "rb") as f:
                    yield i, f.read()
            except OSError as exc:
                yield i, exc
    elif src.reader is not None:
        try:
            for i, data in zip(range(start, stop), src.reader(range(start, stop))):
                yield i, data
        except OSError as exc:  # the rest of the block cannot be read
            raise UndecodableImage(str(exc)) from None
    else:
        pixels = src.pixels(start, stop)
        for i in range(start, stop):
            yield i, pixels[i - start]


def _block_paths(state: Path, b: int) -> Tuple[Path, Path]:
    base = state / BLOCK_DIR / BLOCK_PATTERN.format(b)
    return base.with_suffix(".bin"), base.with_suffix(".json")


def _verified_record(data: Path, record: Path) -> Optional[dict]:
    """The JSON record of a finished file when both are there and the file has the recorded size and
    sha256; None otherwise (missing, half-written, damaged: the file is redone)."""
    if not (data.is_file() and record.is_file()):
        return None
    try:
        rec = json.loads(record.read_text())
    except (ValueError, OSError):
        return None
    if data.stat().st_size != rec.get("bytes") or sha256_file(data) != rec.get("sha256"):
        return None
    return rec


def _block_ok(state: Path, b: int) -> Optional[dict]:
    """The record of block ``b`` when its data file is there and has the recorded sha256."""
    return _verified_record(*_block_paths(state, b))


def _convert_block(task: Tuple[int, str, int, int]) -> dict:
    """Phase 1: convert items [start, stop) into one block file + record; returns the record."""
    b, state, start, stop = task
    opts = _OPTIONS
    chunks, rows, skipped, dropped, offset = [], [], [], [], 0
    try:
        items = list(_raw_items(start, stop))
    except UndecodableImage as exc:
        items = [(i, exc) for i in range(start, stop)]
    for i, raw in items:
        try:
            if isinstance(raw, Exception):
                raise raw
            if isinstance(raw, (bytes, bytearray)):
                jpeg = convert_file(raw, opts.resolution, opts.jpeg_quality, opts.min_size)[0]
            else:
                jpeg = convert_array(raw, opts.resolution, opts.jpeg_quality, opts.min_size)[0]
        except TooSmall as exc:
            dropped.append({"source": _item_name(i), "size": str(exc).split(" ")[0]})
            continue
        except (UndecodableImage, OSError) as exc:
            skipped.append({"source": _item_name(i), "error": str(exc)[:300]})
            continue
        rows.append([i, offset, len(jpeg), int(_SOURCE.labels[i])])
        chunks.append(jpeg)
        offset += len(jpeg)
    blob = b"".join(chunks)
    data_path, record_path = _block_paths(Path(state), b)
    # Temporary names of this process: a slice task and a whole run started by mistake beside it
    # may convert the same block; each renames complete files only (and the bytes are the same).
    atomic_write(data_path, blob, unique=True)
    rec = {"block": b, "start": start, "stop": stop, "bytes": len(blob), "sha256": sha256_bytes(blob),
           "rows": rows, "skipped": skipped, "dropped": dropped}
    atomic_write(record_path, json.dumps(rec).encode(), unique=True)
    return rec


# Phase 2 lookups, set before the assemble workers fork: per item, its block, offset, size, label
# (block -1: skipped or dropped).
_WHERE: Optional[np.ndarray] = None


def _assemble_shard(task: Tuple[int, str, str, str, np.ndarray]) -> dict:
    shard_id, folder, state, name, indices = task
    where = _WHERE
    samples, fds = [], {}
    try:
        for index in indices.tolist():
            b, off, size, label = (int(v) for v in where[index])
            if b < 0:
                continue
            if b not in fds:
                fds[b] = os.open(str(_block_paths(Path(state), b)[0]), os.O_RDONLY)
            jpeg = os.pread(fds[b], size, off)
            if len(jpeg) != size:
                raise OSError(f"block {b} is shorter than its record; rerun to redo it")
            samples.append((f"{index:08d}", jpeg, label))
    finally:
        for fd in fds.values():
            os.close(fd)
    data, index = build_shard(samples)
    save_index(index_path(Path(folder) / name), index)  # before the shard: a shard never lacks its index
    atomic_write(Path(folder) / name, data)
    stats = {"name": name, "samples": len(samples), "bytes": len(data), "sha256": sha256_bytes(data),
             "head_sha256": sha256_bytes(data[:HEAD_BYTES]), "index": index_path(name).name}
    atomic_write(Path(folder) / STATE_DIR / f"{name}.json", json.dumps(stats).encode())
    return stats


def _shard_ok(folder: Path, name: str) -> Optional[dict]:
    shard = folder / name
    if not index_path(shard).is_file():
        return None
    return _verified_record(shard, folder / STATE_DIR / f"{name}.json")


def _run_tasks(fn: Callable, tasks: list, workers: int, sizes: List[int], desc: str, unit: str,
               progress: bool) -> List[dict]:
    from tqdm import tqdm
    bar = tqdm(total=sum(sizes), unit=unit, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    results = []
    try:
        if workers <= 0:
            for task, n in zip(tasks, sizes):
                results.append(fn(task))
                bar.update(n)
            return results
        # fork: the workers inherit _SOURCE; at most 2 tasks per worker in flight bounds memory.
        with mp.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
            pending: deque = deque()
            for task, n in zip(tasks, sizes):
                pending.append((n, pool.apply_async(fn, (task,))))
                while len(pending) >= 2 * workers:
                    k, res = pending.popleft()
                    results.append(res.get())
                    bar.update(k)
            while pending:
                k, res = pending.popleft()
                results.append(res.get())
                bar.update(k)
            pool.close()  # let the workers exit; the with-block's terminate() then has nothing to kill
            pool.join()
        return results
    finally:
        bar.close()


def _worker_init() -> None:
    """Default SIGTERM/SIGUSR2 in the workers: they inherit the parent's handlers through fork, and a
    handler that ignores SIGTERM (submitit's, in a SLURM task) would keep Pool.terminate() waiting."""
    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def slice_blocks(num_blocks: int, k: int, n: int) -> range:
    """Blocks of slice ``k`` of ``n``: contiguous ranges whose union is every block exactly once."""
    return range(num_blocks * k // n, num_blocks * (k + 1) // n)


def prepare(source: Source, out: str | Path, opts: PrepareOptions) -> dict:
    """Write ``source`` to ``out`` and return the manifest (see module docstring for restarts)."""
    global _SOURCE, _OPTIONS, _WHERE
    if opts.format not in FORMATS:
        raise ValueError(f"--format {opts.format!r} is not known; valid: {', '.join(FORMATS)}")
    if opts.resolution is not None and opts.resolution < 1:
        raise ValueError(f"--resolution {opts.resolution} must be a positive size or 'keep'")
    if not 1 <= opts.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality {opts.jpeg_quality} must be in 1..100")
    if opts.samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard {opts.samples_per_shard} must be >= 1")
    if opts.min_size < 0:
        raise ValueError(f"--min-size {opts.min_size} must be >= 0 (0 keeps every image)")
    if opts.slice_ is not None:
        k, n = opts.slice_
        if not (n >= 1 and 0 <= k < n):
            raise ValueError(f"--slice {k}/{n}: needs 0 <= K < N, e.g. --slice 0/4")
        if opts.overwrite:
            raise ValueError("--overwrite cannot be combined with --slice (slices share one output folder); "
                             "clear the output once before submitting the slices")
    if opts.format == "ffcv":
        from .ffcv_loader import require_ffcv
        require_ffcv()  # before any work: fail now rather than after hours of conversion
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = _job_spec(source, opts)
    job_id = _job_id(spec)
    done = _check_existing(out, spec, job_id, opts.overwrite)
    if done is not None:
        print(f"{out}: already complete ({done['num_samples']} samples, job {job_id}); nothing to do",
              file=sys.stderr)
        return done

    shard_dir = out / STAGING_DIR if opts.format == "ffcv" else out
    state = out / STATE_DIR
    (state / BLOCK_DIR).mkdir(parents=True, exist_ok=True)
    (shard_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write(state / "job.json", json.dumps(spec, sort_keys=True).encode(), unique=True)
    if opts.slice_ is None:  # slice tasks may run beside each other: only a whole run clears leftovers
        for folder in (shard_dir, shard_dir / STATE_DIR, state, state / BLOCK_DIR):
            for stale in folder.glob("*.partial"):
                stale.unlink()

    n_items, per = len(source), opts.samples_per_shard
    num_blocks = (n_items + per - 1) // per
    blocks = range(num_blocks) if opts.slice_ is None else slice_blocks(num_blocks, *opts.slice_)
    records, tasks = {}, []
    for b in blocks:
        rec = _block_ok(state, b)
        if rec is not None:
            records[b] = rec
        else:
            tasks.append((b, str(state), b * per, min((b + 1) * per, n_items)))
    if records:
        print(f"{out}: resuming, {len(records)} of {len(blocks)} blocks already converted and verified",
              file=sys.stderr)
    todo = sum(t[3] - t[2] for t in tasks)
    _SOURCE, _OPTIONS = source, opts
    start = time.perf_counter()
    try:
        for rec in _run_tasks(_convert_block, tasks, opts.workers, [t[3] - t[2] for t in tasks],
                              "converting", "img", opts.progress):
            records[rec["block"]] = rec
    finally:
        _SOURCE = _OPTIONS = None
    seconds_convert = time.perf_counter() - start
    if opts.slice_ is not None:
        k, n = opts.slice_
        print(f"{out}: slice {k} of {n}: blocks {blocks.start}..{blocks.stop - 1} converted "
              f"({todo} images in {seconds_convert:.1f} s); run without --slice to assemble the shards",
              file=sys.stderr)
        return {"slice": [k, n], "blocks": [blocks.start, blocks.stop], "images_converted": todo,
                "seconds": round(seconds_convert, 3)}

    where = np.full((n_items, 4), -1, np.int64)
    skipped, dropped = [], []
    for b in range(num_blocks):
        rec = records[b]
        for i, off, size, label in rec["rows"]:
            where[i] = (b, off, size, label)
        skipped.extend(rec["skipped"])
        dropped.extend(rec["dropped"])
    order = np.random.default_rng(opts.shuffle_seed).permutation(n_items)
    chunks = [order[i:i + per] for i in range(0, len(order), per)]
    stats_by_name, shard_tasks = {}, []
    for k, chunk in enumerate(chunks):
        name = SHARD_PATTERN.format(k)
        stats = _shard_ok(shard_dir, name)
        if stats is not None:
            stats_by_name[name] = stats
        else:
            shard_tasks.append((k, str(shard_dir), str(state), name, chunk))
    if stats_by_name:
        print(f"{out}: {len(stats_by_name)} of {len(chunks)} shards already written and verified", file=sys.stderr)
    _WHERE = where
    try:
        for stats in _run_tasks(_assemble_shard, shard_tasks, opts.workers, [1] * len(shard_tasks),
                                "writing shards", "shard", opts.progress):
            stats_by_name[stats["name"]] = stats
    finally:
        _WHERE = None
    shards = [stats_by_name[SHARD_PATTERN.format(k)] for k in range(len(chunks))]
    seconds = time.perf_counter() - start
    num_samples = sum(s["samples"] for s in shards)
    if num_samples == 0:
        raise PrepareError(f"none of the {len(source)} source images could be used ({len(skipped)} undecodable, "
                           f"{len(dropped)} below --min-size {opts.min_size}); first: {(skipped + dropped)[:2]}")

    manifest = {
        "manifest_version": MANIFEST_VERSION, "format": opts.format,
        "num_samples": num_samples, "num_classes": len(source.classes),
        "classes": [{"index": i, "id": c.id, "name": c.name, "source_index": c.source_index}
                    for i, c in enumerate(source.classes)],
        "resolution": opts.resolution, "jpeg_quality": opts.jpeg_quality,
        "samples_per_shard": opts.samples_per_shard, "shuffle_seed": opts.shuffle_seed,
        "source": source.describe(),
        "keys": "8-digit index of the sample in the source listing (sorted classes, sorted files or archive "
                "members; parquet: file and row order; dataset order for cifar10/stl10)",
        "skipped": {"count": len(skipped), "items": skipped},
        "min_size": {"side": opts.min_size, "dropped": len(dropped), "items": dropped},
        "job": {"id": job_id, "spec": spec},
        "writer": {"seconds": round(seconds, 3), "seconds_convert": round(seconds_convert, 3),
                   "images_converted": todo,
                   "images_per_second": round(todo / seconds, 1) if seconds > 0 and todo else None,
                   "workers": opts.workers, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    if opts.format == "webdataset":
        manifest["shards"] = shards
    else:
        from .ffcv_loader import write_beton
        beton = write_beton([shard_dir / s["name"] for s in shards], out / BETON_NAME,
                            workers=max(1, opts.workers))
        manifest["beton"] = beton
        manifest["writer"]["seconds_beton"] = beton.pop("seconds")
    write_manifest(out, manifest)
    _remove([p for p in (out / STATE_DIR, out / STAGING_DIR) if p.exists()])
    print(f"{out}: {num_samples} samples in {len(shards) if opts.format == 'webdataset' else 1} file(s), "
          f"{len(skipped)} skipped, {len(dropped)} below --min-size, "
          f"{manifest['writer']['images_per_second']} images/s", file=sys.stderr)
    return manifest
