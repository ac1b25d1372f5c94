"""FID between two image sets: ``python -m eval.fid A B [--extractor NAME]``.

``A`` and ``B`` are each a statistics ``.npz`` (ours, pytorch-fid's or torch-fidelity's: ``mu`` and
``sigma``), an image folder, a WebDataset shard set, or ``synthetic[:RES[:SIZE[:SEED]]]``, like
pytorch-fid's command line; for checking a dataset against published statistics or a sample dump
against a dataset. Data inputs are read distributed when launched with several processes; two
stats files need no network at all.

``--save-stats OUT.npz`` also writes the statistics of ``A`` (a data input) to ``OUT.npz`` (``mu``,
``sigma`` and our extra keys, so pytorch-fid and torch-fidelity read it; cached like
``eval.reference``: an up-to-date file is reused). ``B`` may then be left out, which only saves the
statistics, as ``python -m pytorch_fid --save-stats DATA OUT`` does. Images that cannot be decoded
are skipped, counted and named in a warning.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Tuple

if __package__ in (None, ""):  # run as a script path: the repository root on sys.path, not this folder (ARCHITECTURE.md)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import numpy as np

from trainer import dist
from eval.data import open_source
from eval.extractors import FeatureExtractor
from eval.reference import add_extractor_args, collect_source, compute_reference, make_extractor
from eval.stats import frechet_distance
from eval.statsfile import StatsError, load_stats
from trainer.errors import UsageError


def is_stats_file(arg: str) -> bool:
    return arg.endswith(".npz") and os.path.isfile(arg)


def stats_of(arg: str, ext: Optional[FeatureExtractor], args, save_to: Optional[str] = None
             ) -> Tuple[np.ndarray, np.ndarray, str]:
    """``(mu, sigma, feature family or "")`` of a stats file or a data spec (saved to ``save_to`` if set)."""
    if is_stats_file(arg):
        ref = load_stats(arg)
        if ext is not None:
            ref.check_compatible(ext.family, ext.dim)
        return ref.mu, ref.sigma, ref.extractor
    source = open_source(arg, args.resolution)
    n = len(source) if args.num_images <= 0 else min(args.num_images, len(source))
    if n < 2:
        raise UsageError(f"{arg}: {n} image(s) give no covariance; FID needs at least 2")
    if save_to:   # writes the file (rank 0), warns about a small N itself
        path = compute_reference(source, ext, save_to, num_images=n, batch_size=args.batch_size,
                                 workers=args.workers, spec=arg)
        saved = load_stats(path)
        return saved.mu, saved.sigma, saved.extractor
    if n < ext.dim:
        dist.print0(f"warning: {arg}: {n} images with {ext.dim}-dimensional features: FID is strongly biased "
                    f"upward at this N; compare only numbers computed with the same N", file=sys.stderr)
    res, _ = collect_source(source, ext, n, batch_size=args.batch_size, workers=args.workers, spec=arg)
    mu, sigma = res.stats.mean_cov()
    return mu, sigma, ext.family


def choose_device(choice: str) -> None:
    """Make ``--device`` the evaluator's device before the process group and the extractor exist."""
    import torch
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if choice == "cpu" and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        # trainer.dist.device() picks CUDA whenever it is visible; hiding it is how a CPU run is asked for.
        if torch.cuda.is_initialized():
            raise UsageError("--device cpu: CUDA is already in use in this process; run the command in a new "
                             "process or with CUDA_VISIBLE_DEVICES=''")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.fid", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("a", metavar="A", help="stats .npz, image folder, shard set or synthetic[:RES[:SIZE[:SEED]]]")
    p.add_argument("b", metavar="B", nargs="?", default=None,
                   help="same choices as A; may be left out with --save-stats (then no FID is computed)")
    p.add_argument("--save-stats", metavar="OUT.npz", default=None,
                   help="also write the statistics of A (a data input) to this .npz (mu, sigma, n, extractor, ...)")
    p.add_argument("--num-images", type=int, default=0, metavar="N",
                   help="use the first N images of data inputs (0: all)")
    p.add_argument("--resolution", type=int, default=None, metavar="R", help="resample data inputs to RxR first")
    p.add_argument("--batch-size", type=int, default=100, metavar="B",
                   help="images per feature-extractor call (per process)")
    p.add_argument("--num-workers", "--workers", dest="workers", type=int, default=2, metavar="N",
                   help="image decoding processes per rank for folders (0: decode in the main process)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when present (one GPU per process when launched with several)")
    add_extractor_args(p)
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.b is None and not args.save_stats:
        raise UsageError(f"only one input ({args.a!r}): give B to compute the FID, or --save-stats OUT.npz to "
                         f"save the statistics of {args.a!r}")
    if args.save_stats is not None:
        if not args.save_stats.endswith(".npz"):
            raise UsageError(f"--save-stats {args.save_stats!r}: expected the output file, ending in .npz "
                             f"(python -m eval.fid DATA --save-stats OUT.npz [B])")
        if is_stats_file(args.a):
            raise UsageError(f"--save-stats: A {args.a!r} is already a statistics file; --save-stats saves the "
                             f"statistics of a data input (image folder, shards, synthetic)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.workers < 0:
        raise UsageError(f"--num-workers {args.workers}: must be at least 0 (0: decode in the main process)")
    choose_device(args.device)
    dist.init()
    inputs = [args.a] + ([args.b] if args.b is not None else [])
    need_net = not all(is_stats_file(x) for x in inputs)
    ext = make_extractor(args) if need_net else None
    mu1, s1, fam1 = stats_of(args.a, ext, args, save_to=args.save_stats)
    if args.b is None:
        dist.print0(f"saved the statistics of {args.a} to {args.save_stats}")
        return 0
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
