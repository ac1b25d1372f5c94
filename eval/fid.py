"""FID between two image sets: ``python -m eval.fid A B [--extractor NAME]``.

``A`` and ``B`` are each a statistics ``.npz`` (ours, pytorch-fid's or torch-fidelity's: ``mu`` and
``sigma``), an image folder, a WebDataset shard set, or ``synthetic[:RES[:SIZE[:SEED]]]``, like
pytorch-fid's command line; for checking a dataset against published statistics or a sample dump
against a dataset. Data inputs are read distributed when launched with several processes; two
stats files need no network at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Tuple

if __package__ in (None, ""):  # run as a script path: import eval/ as the package, not its files
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import numpy as np

from eval import dist
from eval.data import open_source
from eval.extractors import FeatureExtractor
from eval.reference import add_extractor_args, collect_source, make_extractor
from eval.stats import frechet_distance
from eval.statsfile import StatsError, load_stats


def is_stats_file(arg: str) -> bool:
    return arg.endswith(".npz") and os.path.isfile(arg)


def stats_of(arg: str, ext: Optional[FeatureExtractor], args) -> Tuple[np.ndarray, np.ndarray, str]:
    """``(mu, sigma, feature family or "")`` of a stats file or a data spec."""
    if is_stats_file(arg):
        ref = load_stats(arg)
        if ext is not None:
            ref.check_compatible(ext.family, ext.dim)
        return ref.mu, ref.sigma, ref.extractor
    source = open_source(arg, args.resolution)
    n = len(source) if args.num_images <= 0 else min(args.num_images, len(source))
    if n < 2:
        raise ValueError(f"{arg}: {n} image(s) give no covariance; FID needs at least 2")
    if n < ext.dim:
        dist.print0(f"warning: {arg}: {n} images with {ext.dim}-dimensional features: FID is strongly biased "
                    f"upward at this N; compare only numbers computed with the same N", file=sys.stderr)
    res, _ = collect_source(source, ext, n, batch_size=args.batch_size, workers=args.workers, spec=arg)
    mu, sigma = res.stats.mean_cov()
    return mu, sigma, ext.family


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("a", help="stats .npz, image folder, shard set or synthetic[:RES[:SIZE[:SEED]]]")
    p.add_argument("b", help="same choices as A")
    p.add_argument("--num-images", type=int, default=0, help="use the first N images of data inputs (0: all)")
    p.add_argument("--resolution", type=int, default=None, help="resample data inputs to RxR first")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    add_extractor_args(p)
    args = p.parse_args(argv)
    dist.init()
    need_net = not (is_stats_file(args.a) and is_stats_file(args.b))
    ext = make_extractor(args) if need_net else None
    mu1, s1, fam1 = stats_of(args.a, ext, args)
    mu2, s2, fam2 = stats_of(args.b, ext, args)
    if fam1 and fam2 and fam1 != fam2:
        raise StatsError(f"{args.a} holds {fam1!r} statistics and {args.b} holds {fam2!r}: not comparable")
    if dist.is_main():
        print(f"FID: {frechet_distance(mu1, s1, mu2, s2):.6f}", flush=True)
    return 0


def main(argv=None) -> int:
    from eval.errors import cli
    return cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
