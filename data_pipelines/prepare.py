"""Command line: raw dataset -> WebDataset shards or an FFCV .beton (plus manifest.json).

    python -m data_pipelines.prepare /data/imagenet /data/in128 --source imagenet --resolution 128
    python -m data_pipelines.prepare /data/cifar-10-batches-py /data/cifar10 --source cifar10
    python -m data_pipelines.prepare /data/imagenet /data/dogcat256 --source imagenet \\
        --resolution 256 --classes dogs_and_cats

Run it again with the same arguments to finish an interrupted job (or to see that it is done).
ImageNet SRC may also be ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar (labels from the devkit
.tar.gz or LOC_val_solution.csv), Hugging Face imagenet-1k parquet files, or a root holding them.
``--slice K/N`` converts one of N parts (a SLURM array task); the same command without it assembles.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .imagenet_classes import PRESETS
from .sources import SOURCE_KINDS, SourceError, open_source
from .writer import FORMATS, PrepareError, PrepareOptions, prepare


def _resolution(text: str) -> Optional[int]:
    if text.lower() in ("keep", "original", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in pixels or 'keep'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive size in pixels or 'keep'")
    return value


def _slice(text: str):
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N (e.g. 0/4)") from None
    if not (n >= 1 and 0 <= k < n):
        raise argparse.ArgumentTypeError(f"{text!r}: needs 0 <= K < N")
    return k, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.prepare",
        description="Convert a raw image dataset into WebDataset tar shards (img.jpg + cls) or an FFCV "
                    ".beton (RGBImageField + IntField), with a manifest.json. Undecodable images are "
                    "skipped and listed in the manifest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="source folder: ImageNet root or train/val folder, ImageFolder root, "
                               "cifar-10-batches-py, or stl10_binary")
    p.add_argument("out", help="output folder (created); holds the shards or data.beton and manifest.json")
    p.add_argument("--source", required=True, choices=SOURCE_KINDS, help="layout of SRC")
    p.add_argument("--format", default="webdataset", choices=FORMATS, help="output format")
    p.add_argument("--split", default="train",
                   help="train | val (imagenet, imagefolder) | test (cifar10, stl10, imagefolder) | "
                        "unlabeled (stl10)")
    p.add_argument("--resolution", type=_resolution, default="keep", metavar="N|keep",
                   help="centre square resized to NxN (the paper uses 128 / 256 for ImageNet); "
                        "'keep' stores the original images")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of re-encoded images (1..100)")
    p.add_argument("--classes", default=None,
                   help="class subset: a preset (%s), a comma-separated list of ids/names, or @FILE with one "
                        "id per line" % ", ".join(sorted(PRESETS)))
    p.add_argument("--allow-partial", action="store_true",
                   help="ImageNet: accept a source lacking some of the 1000 (or --classes) classes; labels keep "
                        "the standard (or declared) numbering and the missing classes stay empty")
    p.add_argument("--labels", default=None,
                   help="ImageNet val labels: LOC_val_solution.csv (Kaggle), ILSVRC2012_devkit_t12.tar.gz, or the "
                        "devkit's ILSVRC2012_validation_ground_truth.txt (meta.mat beside it); searched near SRC "
                        "if unset")
    p.add_argument("--min-size", type=int, default=0, metavar="N",
                   help="drop images whose shorter side is below N px (counted in the manifest); the official "
                        "256 px ImageNet preprocessing uses 256")
    p.add_argument("--slice", type=_slice, default=None, metavar="K/N",
                   help="convert only part K of N (0-based) and stop; run the command without --slice "
                        "afterwards to assemble the shards (one SLURM array task per part)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="parallel conversion processes (0: in this process)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the one-time shuffle across shards")
    p.add_argument("--overwrite", action="store_true", help="replace an output written with other options")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.allow_partial and args.source != "imagenet":
            raise SourceError(f"--allow-partial applies to --source imagenet only (not {args.source})")
        source = open_source(args.source, args.src, args.split, labels_file=args.labels, classes=args.classes,
                             allow_partial=args.allow_partial)
        opts = PrepareOptions(format=args.format, resolution=args.resolution, jpeg_quality=args.jpeg_quality,
                              samples_per_shard=args.samples_per_shard, workers=args.workers,
                              shuffle_seed=args.shuffle_seed, overwrite=args.overwrite, progress=not args.quiet,
                              min_size=args.min_size, slice_=args.slice)
        if source.details.get("rows_with_wnid_checked") == 0:
            print("warning: no image.path in these parquet files names a WordNet id, so their label order could "
                  "not be checked against the standard sorted-wnid order", file=sys.stderr)
        print(f"{args.source} {args.split}: {len(source)} images, {len(source.classes)} classes -> "
              f"{args.out} ({args.format})", file=sys.stderr)
        prepare(source, args.out, opts)
    except (SourceError, PrepareError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
