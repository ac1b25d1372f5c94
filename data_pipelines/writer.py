"""Source -> WebDataset shards or an FFCV .beton, in parallel, restartable, with a manifest.

Order and keys. The items of the source (sorted classes, sorted files) are shuffled once with
``shuffle_seed`` and cut into shards of ``samples_per_shard``, so every shard holds a mix of classes
(ImageNet in folder order would give one-class shards, and a loader's shuffle buffer could not mix
them). A sample's key is its 8-digit index in the *unshuffled* listing, so it names its source file.

Restart semantics. The job (source, options) is hashed. The first thing written is
``.prepare-state/job.json``; each shard is written to ``NAME.partial`` and renamed when complete,
followed by its stats file; ``manifest.json`` is written last. Running again with the same job:

* manifest present -> nothing to do (no-op);
* manifest absent (interrupted) -> finished shards are kept, the rest are written, partial files
  are discarded;
* a *different* job over an existing output -> refused unless ``overwrite`` (which first deletes
  only the files this writer makes).

FFCV: the same shards are written to ``.ffcv-staging/`` and then copied into ``data.beton`` without
re-encoding (the JPEG bytes are stored as they are), so both formats hold identical pixels.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .imaging import UndecodableImage, convert_array, convert_file
from .manifest import MANIFEST_NAME, MANIFEST_VERSION, read_manifest, write_manifest
from .sources import Source
from .tario import HEAD_BYTES, atomic_write, build_shard, index_path, save_index, sha256_bytes

FORMATS = ("webdataset", "ffcv")
STATE_DIR = ".prepare-state"
STAGING_DIR = ".ffcv-staging"
BETON_NAME = "data.beton"
SHARD_PATTERN = "shard-{:06d}.tar"
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
            "samples_per_shard": opts.samples_per_shard, "shuffle_seed": opts.shuffle_seed}


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


def _convert_one(index: int) -> Tuple[bytes, str]:
    """Item ``index`` of the source -> JPEG bytes (raises UndecodableImage / OSError)."""
    src, opts = _SOURCE, _OPTIONS
    if src.files is not None:
        with open(src.files[index], "rb") as f:
            data = f.read()
        return convert_file(data, opts.resolution, opts.jpeg_quality)[0], src.files[index]
    pixels = src.pixels(index, index + 1)[0]
    return convert_array(pixels, opts.resolution, opts.jpeg_quality)[0], f"{src.kind}:{src.split}#{index}"


def _write_shard(task: Tuple[int, str, str, np.ndarray]) -> dict:
    shard_id, folder, name, indices = task
    samples, skipped = [], []
    for index in indices.tolist():
        try:
            jpeg, _ = _convert_one(index)
        except (UndecodableImage, OSError) as exc:
            where = _SOURCE.files[index] if _SOURCE.files is not None else f"#{index}"
            skipped.append({"source": where, "error": str(exc)[:300]})
            continue
        samples.append((f"{index:08d}", jpeg, int(_SOURCE.labels[index])))
    data, index = build_shard(samples)
    save_index(index_path(Path(folder) / name), index)  # before the shard: a shard never lacks its index
    atomic_write(Path(folder) / name, data)
    stats = {"name": name, "samples": len(samples), "bytes": len(data), "sha256": sha256_bytes(data),
             "head_sha256": sha256_bytes(data[:HEAD_BYTES]), "index": index_path(name).name, "skipped": skipped}
    atomic_write(Path(folder) / STATE_DIR / f"{name}.json", json.dumps(stats).encode())
    return stats


def _run_tasks(tasks: list, workers: int, total: int, progress: bool) -> List[dict]:
    from tqdm import tqdm
    bar = tqdm(total=total, unit="img", desc="writing shards", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    results = []
    try:
        if workers <= 0:
            for task in tasks:
                results.append(_write_shard(task))
                bar.update(len(task[3]))
            return results
        # fork: the workers inherit _SOURCE; at most 2 tasks per worker in flight bounds memory.
        with mp.get_context("fork").Pool(workers) as pool:
            pending: deque = deque()
            queue = iter(tasks)
            for task in queue:
                pending.append((len(task[3]), pool.apply_async(_write_shard, (task,))))
                while len(pending) >= 2 * workers:
                    n, res = pending.popleft()
                    results.append(res.get())
                    bar.update(n)
            while pending:
                n, res = pending.popleft()
                results.append(res.get())
                bar.update(n)
        return results
    finally:
        bar.close()


def prepare(source: Source, out: str | Path, opts: PrepareOptions) -> dict:
    """Write ``source`` to ``out`` and return the manifest (see module docstring for restarts)."""
    global _SOURCE, _OPTIONS
    if opts.format not in FORMATS:
        raise ValueError(f"--format {opts.format!r} is not known; valid: {', '.join(FORMATS)}")
    if opts.resolution is not None and opts.resolution < 1:
        raise ValueError(f"--resolution {opts.resolution} must be a positive size or 'keep'")
    if not 1 <= opts.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality {opts.jpeg_quality} must be in 1..100")
    if opts.samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard {opts.samples_per_shard} must be >= 1")
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
    (shard_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    (out / STATE_DIR).mkdir(exist_ok=True)
    atomic_write(out / STATE_DIR / "job.json", json.dumps(spec, sort_keys=True).encode())
    for stale in shard_dir.glob("*.partial"):
        stale.unlink()

    order = np.random.default_rng(opts.shuffle_seed).permutation(len(source))
    chunks = [order[i:i + opts.samples_per_shard] for i in range(0, len(order), opts.samples_per_shard)]
    stats_by_name, tasks = {}, []
    for k, chunk in enumerate(chunks):
        name = SHARD_PATTERN.format(k)
        state = shard_dir / STATE_DIR / f"{name}.json"
        if (shard_dir / name).is_file() and state.is_file():  # finished by an interrupted run
            stats_by_name[name] = json.loads(state.read_text())
        else:
            tasks.append((k, str(shard_dir), name, chunk))
    todo = sum(len(t[3]) for t in tasks)
    if stats_by_name:
        print(f"{out}: resuming, {len(stats_by_name)} of {len(chunks)} shards already written", file=sys.stderr)

    _SOURCE, _OPTIONS = source, opts
    start = time.perf_counter()
    try:
        for stats in _run_tasks(tasks, opts.workers, todo, opts.progress):
            stats_by_name[stats["name"]] = stats
    finally:
        _SOURCE = _OPTIONS = None
    shards = [stats_by_name[SHARD_PATTERN.format(k)] for k in range(len(chunks))]
    skipped = [item for s in shards for item in s.pop("skipped")]
    seconds = time.perf_counter() - start
    num_samples = sum(s["samples"] for s in shards)
    if num_samples == 0:
        raise RuntimeError(f"none of the {len(source)} source images could be decoded; "
                           f"first errors: {skipped[:3]}")

    manifest = {
        "manifest_version": MANIFEST_VERSION, "format": opts.format,
        "num_samples": num_samples, "num_classes": len(source.classes),
        "classes": [{"index": i, "id": c.id, "name": c.name, "source_index": c.source_index}
                    for i, c in enumerate(source.classes)],
        "resolution": opts.resolution, "jpeg_quality": opts.jpeg_quality,
        "samples_per_shard": opts.samples_per_shard, "shuffle_seed": opts.shuffle_seed,
        "source": source.describe(),
        "keys": "8-digit index of the sample in the source listing (sorted classes, sorted files; "
                "dataset order for cifar10/stl10)",
        "skipped": {"count": len(skipped), "items": skipped},
        "job": {"id": job_id, "spec": spec},
        "writer": {"seconds": round(seconds, 3), "images_converted": todo,
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
          f"{len(skipped)} skipped, {manifest['writer']['images_per_second']} images/s", file=sys.stderr)
    return manifest
