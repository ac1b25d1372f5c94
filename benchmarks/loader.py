"""Loader throughput per core: our WebDataset and FFCV loaders vs the webdataset library's own
WebLoader vs ImageFolder + PIL vs bare decoding.

Two image sets:

* ``cifar10``: the real CIFAR-10 JPEGs of ``../shared/data/cifar10-jpg.tar.gz`` (50,000 train
  images, 32 px), unpacked to the work folder;
* ``imagenet128``: an ImageNet-like folder this script generates (photo-sized JPEGs of 250-500 px,
  10 classes), written to 128 px shards; the ImageFolder and bare-decode contenders read the very
  128 px JPEGs stored in the shards (extracted to a folder), so every loader decodes the same bytes.

Writers: ``python -m data_pipelines.prepare`` to WebDataset and to FFCV, with all cores; reported
as images/s (and per core).

Loaders, each given one core: ImageFolder and our WebDataset loader with one DataLoader worker
process (the real path: decode in the worker, batch handed over in shared memory), FFCV with one
thread, the bare loops in this process; batches of ``--batch``. The rate is images per CPU-second
spent by this process and its worker processes together (user + system time), i.e. the per-core
rate, which other jobs on the machine do not distort the way they distort wall time. Contenders:

* ``bare decode``: torchvision's libjpeg-turbo decoder over the JPEG bytes held in memory, each
  image once, the result dropped -- the per-core limit of any loader using that decoder;
* ``bare decode+batch``: the same, keeping the images and stacking them into batches (what any
  loader must at least do);
* ``bare PIL decode``: ``Image.open(...).convert("RGB")`` over the same bytes, for reference;
* ``imagefolder``: ``torchvision.datasets.ImageFolder`` + PIL + ``PILToTensor`` + DataLoader
  (shuffled, default collate): the usual baseline;
* ``webdataset``: our loader (``data.backend=webdataset``, shuffle buffer 2000), one worker;
* ``webdataset in-proc``: the same with ``num_workers=0`` (no hand-over between processes);
* ``webdataset streamed``: our loader given the same shards as ``pipe:cat DIR/shard-{...}.tar``,
  i.e. the remote path (``webdataset.gopen``, the tar parsed as it streams, no index), one worker;
* ``wds library``: the package our loader replaces, as its documentation builds a training
  pipeline: ``wds.WebDataset(shards, resampled=True).shuffle(2000).decode("torchrgb8")
  .to_tuple("img.jpg", "cls").batched(B)`` in ``wds.WebLoader(..., num_workers=1)`` -- same shards,
  batch size, shuffle buffer and worker count; uint8 CHW images like ours (``torchrgb`` would add a
  float conversion);
* ``wds library+tv dec``: the same pipeline with torchvision's decoder (ours) mapped over the raw
  image bytes instead of ``.decode`` (PIL), which separates the pipeline's cost from the decoder's;
* ``ffcv``: our FFCV loader (``data.backend=ffcv``), where ffcv is installed.

Each repetition runs every contender over ``--images`` images in turn (interleaved, so a change in
load hits all alike); the median over ``--reps`` is reported with the ratios to ImageFolder and to
the bare decode and to the webdataset library. Run from the repository root:
``python benchmarks/loader.py`` (~5 minutes on 2 cores; ``--sets cifar10`` for the 32 px set only).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_pipelines import DataConfig, build_train_stream  # noqa: E402
from data_pipelines.fakedata import pattern  # noqa: E402
from data_pipelines.manifest import read_manifest  # noqa: E402
from data_pipelines.prepare import main as prepare_main  # noqa: E402
from data_pipelines.tario import key_at, load_index, read_shard  # noqa: E402
from data_pipelines.wds_loader import jpeg_decoder  # noqa: E402


# ----------------------------------------------------------------------------------------------
# data


def unpack_cifar(tar_path: Path, work: Path) -> Path:
    dest = work / "cifar10-jpg"
    if not (dest / "train").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_path) as tar:
            try:
                tar.extractall(dest, filter="data")
            except TypeError:  # Python without extraction filters (< 3.10.12)
                tar.extractall(dest)
    return dest / "train"


def make_imagenet_like(folder: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """Photo-sized JPEGs (smooth structure + sensor-like noise, quality 90) in ImageFolder layout."""
    from PIL import Image
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.JPEG")) == n:
        return folder
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(250, 501)), int(rng.integers(250, 501))
        img = pattern(i, h, w).astype(np.int16) + rng.normal(0, 9, (h, w, 3)).astype(np.int16)
        path = folder / f"n{i % classes:08d}" / f"n{i % classes:08d}_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return folder


def extract_shards(shards: Path, folder: Path) -> Path:
    """The JPEG bytes stored in the shards, as an ImageFolder tree (class = label)."""
    if folder.is_dir():
        return folder
    for entry in read_manifest(shards)["shards"]:
        path = shards / entry["name"]
        buf = read_shard(path)
        for offset, size, label, _ in load_index(path, buf)[0].tolist():
            out = folder / f"{label:04d}" / f"{key_at(buf, offset)}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(bytes(buf[offset:offset + size]))
    return folder


def write(src: Path, out: Path, fmt: str, resolution: str, workers: int) -> dict:
    if not (out / "manifest.json").is_file():
        code = prepare_main([str(src), str(out), "--source", "imagefolder", "--format", fmt, "--resolution",
                             resolution, "--workers", str(workers), "--quiet"])
        if code:
            raise SystemExit(f"prepare failed for {out}")
    return read_manifest(out)


# ----------------------------------------------------------------------------------------------
# contenders: each is an infinite iterator of batches; the harness counts images


def bare_decode(blobs, batch: int, keep: bool):
    decode = jpeg_decoder()
    while True:
        for start in range(0, len(blobs) - batch + 1, batch):
            if keep:
                yield torch.stack([decode(b) for b in blobs[start:start + batch]])
            else:
                for b in blobs[start:start + batch]:
                    decode(b)
                yield batch


def bare_pil(blobs, batch: int):
    from PIL import Image
    while True:
        for start in range(0, len(blobs) - batch + 1, batch):
            for b in blobs[start:start + batch]:
                Image.open(io.BytesIO(b.numpy().tobytes())).convert("RGB")
            yield batch


def imagefolder(folder: Path, batch: int):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import PILToTensor
    dataset = ImageFolder(str(folder), transform=PILToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=1, drop_last=True,
                                         persistent_workers=True, prefetch_factor=4,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
    while True:
        yield from loader


def wds_library(shards: Path, batch: int, workers: int = 1, our_decoder: bool = False):
    """The webdataset package's own pipeline over the same shards (endless: resampled shards);
    ``our_decoder``: with torchvision's decoder mapped over the raw bytes instead of ``.decode``."""
    import webdataset as wds
    urls = [str(shards / e["name"]) for e in read_manifest(shards)["shards"]]
    dataset = wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None).shuffle(2000)
    if our_decoder:
        decode = jpeg_decoder()
        dataset = dataset.to_tuple("img.jpg", "cls").map_tuple(
            lambda b: decode(torch.frombuffer(bytearray(b), dtype=torch.uint8)), int)
    else:
        dataset = dataset.decode("torchrgb8").to_tuple("img.jpg", "cls")
    dataset = dataset.batched(batch, partial=False)
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4, persistent_workers=True,
                           worker_init_fn=lambda _: torch.set_num_threads(1))
    while True:
        yield from loader


def streamed_spec(shards: Path) -> str:
    """Our loader's remote path over local shards: one ``cat`` per shard through webdataset.gopen."""
    n = len(read_manifest(shards)["shards"])
    return f"pipe:cat {shards}/shard-{{000000..{n - 1:06d}}}.tar"


def ours(backend: str, path, resolution: int, batch: int, workers: int = 1):
    cfg = DataConfig(backend=backend, path=str(path), resolution=resolution, num_workers=workers, shuffle_buffer=2000,
                     verify="off")
    return iter(build_train_stream(cfg, batch_size=batch, rank=0, world_size=1, seed=0))


def cpu_seconds(pids) -> float:
    """CPU time (user + system) of this process (all its threads) and of the worker processes
    ``pids``, including the reader processes a worker started and waited for (``cat`` of the
    streamed row)."""
    import psutil
    total = sum(psutil.Process().cpu_times()[:2])
    for pid in pids:
        try:
            total += sum(psutil.Process(pid).cpu_times()[:4])
        except psutil.NoSuchProcess:
            pass
    return total


def children() -> set:
    """The loader worker processes: direct children (their own short-lived readers are counted
    through them, see cpu_seconds)."""
    import psutil
    return {c.pid for c in psutil.Process().children(recursive=False)}


def count(item) -> int:
    return item if isinstance(item, int) else len(item[0]) if isinstance(item, (tuple, list)) else len(item)


def measure(iterator, pids, images: int, drain: int = 6) -> float:
    """Images per CPU-second (this process + the contender's workers) over ``images`` images.

    A worker keeps decoding ahead while other contenders are measured; the first ``drain`` batches
    are taken untimed so that the prefetch queue is empty at the start as it is at the end.
    """
    for _ in range(drain):
        next(iterator)
    n = 0
    start = cpu_seconds(pids)
    while n < images:
        n += count(next(iterator))
    return n / (cpu_seconds(pids) - start)


def load_blobs(folder: Path):
    files = sorted(folder.rglob("*.jpg")) + sorted(folder.rglob("*.JPEG"))
    return [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]


def bench_set(name: str, folder: Path, shards: Path, beton: Path | None, resolution: int, args) -> dict:
    blobs = load_blobs(folder)
    np.random.default_rng(0).shuffle(blobs)
    contenders = {
        "bare decode": bare_decode(blobs, args.batch, keep=False),
        "bare decode+batch": bare_decode(blobs, args.batch, keep=True),
        "bare PIL decode": bare_pil(blobs, args.batch),
        "imagefolder": imagefolder(folder, args.batch),
        "webdataset": ours("webdataset", shards, resolution, args.batch),
        "webdataset in-proc": ours("webdataset", shards, resolution, args.batch, workers=0),
        "webdataset streamed": ours("webdataset", streamed_spec(shards), resolution, args.batch),
        "wds library": wds_library(shards, args.batch),
        "wds library+tv dec": wds_library(shards, args.batch, our_decoder=True),
    }
    if beton is not None:
        contenders["ffcv"] = ours("ffcv", beton, resolution, args.batch)
    images = args.images
    pids = {}
    for k, it in contenders.items():  # warm-up: start workers, fill the page cache, FFCV compiles
        before = children()
        next(it)
        pids[k] = children() - before
        measure(it, pids[k], args.batch * 2)
    rates = {k: [] for k in contenders}
    for _ in range(args.reps):
        for k, it in contenders.items():
            rates[k].append(measure(it, pids[k], images))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{name}: {len(blobs)} images at {resolution}px, {images} per measurement, median of {args.reps}, "
          f"worker processes: {', '.join(f'{k} {len(v)}' for k, v in pids.items() if v)}")
    print(f"{'loader':20s} {'images/s/core':>14s} {'x imagefolder':>14s} {'x bare decode':>14s} {'x wds library':>14s}")
    for k, v in med.items():
        print(f"{k:20s} {v:14.0f} {v / med['imagefolder']:14.2f} {v / med['bare decode']:14.2f} "
              f"{v / med['wds library']:14.2f}")
    return {"images": len(blobs), "resolution": resolution, "per_core_images_per_s": med, "all": rates,
            "ratios": {k: {"vs_imagefolder": v / med["imagefolder"], "vs_bare_decode": v / med["bare decode"],
                           "vs_bare_decode_batch": v / med["bare decode+batch"],
                           "vs_wds_library": v / med["wds library"]} for k, v in med.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cifar", default=os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg.tar.gz"),
                   help="the CIFAR-10 JPEG archive")
    p.add_argument("--work", default="/tmp/sngan-loader-bench", help="folder for unpacked data and shards")
    p.add_argument("--imagenet-like", type=int, default=3000, help="images of the generated 128 px set")
    p.add_argument("--batch", type=int, default=256, help="batch size")
    p.add_argument("--images", type=int, default=10240, help="images per measurement (capped by the set)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes")
    p.add_argument("--no-ffcv", action="store_true", help="skip FFCV even if installed")
    p.add_argument("--sets", default="cifar10,imagenet128", help="image sets to measure (comma-separated)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        import ffcv  # noqa: F401
        use_ffcv = not args.no_ffcv
    except ImportError:
        use_ffcv = False
        print("ffcv not installed: FFCV rows skipped (tests/install_ffcv.sh installs it)")
    results = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "writer": {}}

    wanted = set(args.sets.split(","))
    unknown = wanted - {"cifar10", "imagenet128"}
    if unknown:
        raise SystemExit(f"--sets: unknown {sorted(unknown)}; valid: cifar10, imagenet128")
    sets = [("cifar10", lambda: unpack_cifar(Path(args.cifar), work), "32", 32),
            ("imagenet128", lambda: make_imagenet_like(work / "imagenet-like", args.imagenet_like), "128", 128)]
    for name, make_src, res, res_int in sets:
        if name not in wanted:
            continue
        src = make_src()
        wds = write(src, work / f"{name}-wds", "webdataset", res, args.workers)
        results["writer"][f"{name} webdataset"] = wds["writer"]
        beton = None
        if use_ffcv:
            ff = write(src, work / f"{name}-ffcv", "ffcv", res, args.workers)
            results["writer"][f"{name} ffcv"] = ff["writer"]
            beton = work / f"{name}-ffcv"
        # CIFAR's source JPEGs are already 32 px RGB and are stored as they are; for the 128 px set
        # the contenders read the 128 px JPEGs of the shards.
        folder = src if name == "cifar10" else extract_shards(work / f"{name}-wds", work / f"{name}-jpegs")
        results[name] = bench_set(name, folder, work / f"{name}-wds", beton, res_int, args)

    print("\nwriters (all cores; images/s over the whole job, conversion + shards + manifest):")
    for k, w in results["writer"].items():
        extra = f", .beton copy {w['seconds_beton']} s" if "seconds_beton" in w else ""
        print(f"  {k:24s} {w['images_per_second']} images/s with {w['workers']} workers{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
