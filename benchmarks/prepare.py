"""prepare throughput per core against a torchvision ImageFolder + PIL decode-resize loop, same run.

    python benchmarks/prepare.py [--images 3000] [--sizes 128 256] [--out benchmarks/results/prepare.json]

Image sets:

* ``cifar10``: the real JPEGs of ``../shared/data/cifar10-jpg.tar.gz`` (32 px; the first
  ``--images`` of the train split, all 10 classes), unpacked to a temporary folder;
* ``photo-sized``: generated JPEGs of ImageNet's typical size (500x375 and 375x500, quality 90),
  because decoding a 32 px image costs far less than decoding an ImageNet photo, and the
  projection for ILSVRC-2012 should rest on photo-sized decodes. They are synthetic pictures with
  grain, so that a file weighs what an ILSVRC-2012 train JPEG weighs on average (about 110 KB).

Contenders, each on one core (``--workers 0``: everything in this process), timed by CPU time of
this process (user + system), which other jobs on the machine do not inflate the way they do wall
time:

* ``prepare``: ``data_pipelines.writer.prepare`` on an ``imagefolder`` source at N px: decode,
  centre square resize, JPEG encode (quality 95), block files, shard assembly, manifest;
* ``imagefolder``: ``torchvision.datasets.ImageFolder`` with ``Resize(N) + CenterCrop(N)`` (PIL),
  iterated image by image: decode and resize only, nothing encoded or written.

The ratio prepare / imagefolder is reported, and the projected time for the 1,281,167 ILSVRC-2012
train images at the photo-sized rate: on 1 core, on one 32-core node, on 4 such nodes (the
convert phase divided over the cores, assuming linear scaling as the work is independent per
block; the assembly, measured separately, divided over the 32 cores of the one node that runs
the merge job; both ignore storage limits: reading 140 GB in 2 minutes needs about 1 GB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipelines.fakedata import pattern  # noqa: E402
from data_pipelines.sources import open_source  # noqa: E402
from data_pipelines.writer import PrepareOptions, prepare  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cifar_subset(work: Path, n: int) -> Path:
    archive = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
    if not archive.is_file():
        raise SystemExit(f"{archive} not found (see ../shared/data/README.md)")
    root = work / "cifar10"
    per_class = max(1, n // 10)
    counts: dict = {}
    with tarfile.open(archive) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or "train" not in parts:
                continue
            cls = parts[-2]
            if counts.get(cls, 0) >= per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            dest = root / cls / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(m).read())
            if sum(counts.values()) >= per_class * 10:
                break
    return root


def photo_sized(work: Path, n: int) -> Path:
    """500x375 / 375x500 JPEGs with grain, so that they weigh what ILSVRC-2012 train JPEGs weigh on
    average (about 110 KB: 138 GB / 1.28 M); decode cost grows with the coded data."""
    import numpy as np
    from PIL import Image
    root = work / "photo"
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (375, 500) if i % 3 else (500, 375)
        dest = root / f"c{i % 10}" / f"{i:06d}.JPEG"
        dest.parent.mkdir(parents=True, exist_ok=True)
        grain = rng.normal(0, 26, (h, w, 3))
        Image.fromarray((pattern(i, h, w) + grain).clip(0, 255).astype(np.uint8)).save(dest, format="JPEG", quality=90)
    return root


def mean_kb(src: Path) -> float:
    sizes = [f.stat().st_size for f in src.rglob("*") if f.is_file()]
    return sum(sizes) / len(sizes) / 1024


def run_prepare(src: Path, out: Path, size: int) -> dict:
    source = open_source("imagefolder", str(src))
    c0 = cpu()
    m = prepare(source, out, PrepareOptions(resolution=size, workers=0, samples_per_shard=500, progress=False))
    total = cpu() - c0
    shutil.rmtree(out)
    convert_share = m["writer"]["seconds_convert"] / m["writer"]["seconds"] if m["writer"]["seconds"] else 1.0
    return {"images": len(source), "cpu_s": total, "per_core": len(source) / total,
            "convert_per_core": len(source) / (total * convert_share),
            "assemble_s_per_image": total * (1 - convert_share) / len(source)}


def run_imagefolder(src: Path, size: int) -> dict:
    from torchvision import datasets, transforms
    ds = datasets.ImageFolder(str(src), transform=transforms.Compose([transforms.Resize(size),
                                                                       transforms.CenterCrop(size)]))
    c0 = cpu()
    for i in range(len(ds)):
        img, _ = ds[i]
    total = cpu() - c0
    return {"images": len(ds), "cpu_s": total, "per_core": len(ds) / total}


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="images per set")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {"images": args.images, "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = {"cifar10 (real JPEGs, 32 px)": cifar_subset(work, args.images),
                "photo-sized (generated, 500x375)": photo_sized(work, args.images)}
        for name, src in sets.items():
            results["sets"].setdefault(name, {})["mean_file_kb"] = round(mean_kb(src), 1)
            print(f"{name}: {args.images} images, mean file {mean_kb(src):.1f} KB", flush=True)
            for size in args.sizes:
                ours = run_prepare(src, work / "out", size)
                base = run_imagefolder(src, size)
                row = {"prepare": ours, "imagefolder": base, "ratio": ours["per_core"] / base["per_core"]}
                results["sets"].setdefault(name, {})[str(size)] = row
                print(f"{name:34s} {size:4d} px: prepare {ours['per_core']:7.1f} img/s/core "
                      f"(convert {ours['convert_per_core']:7.1f}), ImageFolder+PIL decode-resize "
                      f"{base['per_core']:7.1f} img/s/core, ratio {row['ratio']:.2f}", flush=True)
    print("\nprojection for the 1,281,167 ILSVRC-2012 train images (photo-sized rate, linear in cores):")
    for size, row in results["sets"]["photo-sized (generated, 500x375)"].items():
        if size == "mean_file_kb":
            continue
        conv = row["prepare"]["convert_per_core"]
        assemble = row["prepare"]["assemble_s_per_image"] * IMAGENET_TRAIN
        # the merge job assembles on one node, with that node's cores (prepare --workers)
        proj = {cores: IMAGENET_TRAIN / (conv * cores) + assemble / min(cores, 32) for cores in (1, 32, 128)}
        row["projection_s"] = {str(k): round(v, 1) for k, v in proj.items()}
        print(f"  {size} px: 1 core {hours(proj[1])}, 32 cores {hours(proj[32])}, 4 x 32 cores {hours(proj[128])} "
              f"(assembly: {hours(assemble)} of CPU time, on one node)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
