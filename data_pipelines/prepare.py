"""Command line: raw dataset -> WebDataset shards or an FFCV .beton (plus manifest.json).

    python -m data_pipelines.prepare /data/imagenet /data/in128 --source imagenet --resolution 128
    python -m data_pipelines.prepare /data/cifar-10-batches-py /data/cifar10 --source cifar10
    python -m data_pipelines.prepare /data/imagenet /data/dogcat256 --source imagenet \\
        --resolution 256 --classes dogs_and_cats

Run it again with the same arguments to finish an interrupted job (or to see that it is done).
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
    p.add_argument("--labels", default=None,
                   help="ImageNet val labels: LOC_val_solution.csv (Kaggle) or the devkit's "
                        "ILSVRC2012_validation_ground_truth.txt (meta.mat beside it); searched near SRC if unset")
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
        source = open_source(args.source, args.src, args.split, labels_file=args.labels, classes=args.classes)
        opts = PrepareOptions(format=args.format, resolution=args.resolution, jpeg_quality=args.jpeg_quality,
                              samples_per_shard=args.samples_per_shard, workers=args.workers,
                              shuffle_seed=args.shuffle_seed, overwrite=args.overwrite, progress=not args.quiet)
        print(f"{args.source} {args.split}: {len(source)} images, {len(source.classes)} classes -> "
              f"{args.out} ({args.format})", file=sys.stderr)
        prepare(source, args.out, opts)
    except (SourceError, PrepareError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
