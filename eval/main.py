"""Evaluate a generator: ``accelerate launch eval/main.py --ckpt PATH --ref STATS [--metrics ...]``.

Also runs as ``python eval/main.py``, ``python -m eval.main`` and under ``torchrun``. Every rank
generates a disjoint exact slice of the N samples (balanced labels for conditional models, noise a
pure function of (seed, class, index), see :mod:`eval.generate`), extracts features and keeps
float64 sufficient statistics; one all_reduce gives the exact statistics and rank 0 computes:

- ``fid``: Frechet distance to the reference ``mu``/``sigma``;
- ``is``: Inception Score (10 splits), from logits gathered to rank 0 only when asked;
- ``kid``: KID (100 subsets of 1000, cubic polynomial kernel) against the reference features
  (``eval.reference --keep-features``), from features gathered to rank 0 only when asked
  (``N * 2048 * 4`` bytes: 410 MB for 50k);
- ``intra_fid`` (conditional models): ``--per-class`` samples of each class (5000 as in the
  projection paper), FID of each class against the reference's per-class statistics, averaged.
  Classes are processed in groups with one all_reduce each; the per-class FIDs are spread over
  the ranks. When N == classes * per-class, FID/IS/KID reuse the same samples.
- ``precision``, ``recall``, ``density``, ``coverage`` (groups ``pr``, ``dc``): improved precision
  and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020) with k-NN
  balls of ``--prdc-k`` (3) neighbours, between evenly spaced subsets of at most ``--prdc-num``
  (10000) generated and reference features (the reference's ``prdc_features`` or ``features``),
  every rank computing its rows' distances (see :mod:`eval.prdc`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator

if __package__ in (None, ""):  # run as a script path: the repository root on sys.path, not this folder (ARCHITECTURE.md)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch

from trainer import dist
from eval.ckpt import CheckpointError, check_run_config, checkpoint_folder, resolve_generator
from eval.collect import Collector
from eval.extractors import FeatureExtractor
from eval.errors import cli
from eval import prdc
from eval.generate import Plan, SampleHealth, balanced_counts, generate, rank_batches
from eval.reference import add_extractor_args, make_extractor
from eval.stats import SufficientStats, frechet_distance, inception_score, kernel_inception_distance, mean_of
from eval.statsfile import ReferenceStats, StatsError, load_stats
from trainer.errors import UsageError

METRICS = ("fid", "is", "kid", "intra_fid") + prdc.METRICS
METRIC_GROUPS = prdc.GROUPS  # pr = precision,recall; dc = density,coverage; prdc = all four
CLASS_GROUP_BYTES = 2 << 30  # per-class statistics held at once during intra-FID (per rank)


@dataclass
class EvalOptions:
    metrics: tuple = ("fid",)
    num_samples: int = 50000
    per_class: int = 5000
    batch_size: int = 100
    seed: int = 0
    which: str = "auto"
    is_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prdc_k: int = prdc.DEFAULT_K
    prdc_num: int = prdc.DEFAULT_NUM


def parse_metrics(text: str) -> tuple:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS and m not in METRIC_GROUPS]
    if bad or not names:
        groups = ", ".join(g + "=" + ",".join(ms) for g, ms in METRIC_GROUPS.items())
        raise UsageError(f"--metrics {text!r}: unknown {bad}; valid: {','.join(METRICS)} (groups: {groups})")
    return prdc.expand(names)


def _num_classes(G, gmeta: dict) -> int:
    return int(getattr(G, "num_classes", gmeta.get("kwargs", {}).get("num_classes", 0)) or 0)


def _check(G, ref: ReferenceStats, ext: FeatureExtractor, opts: EvalOptions, num_classes: int, gen_path: str):
    ref.check_compatible(ext.family, ext.dim)
    with torch.no_grad():
        z = torch.randn(1, G.z_dim, device=dist.device())
        y = torch.zeros(1, dtype=torch.int64, device=z.device) if num_classes else None
        res = G(z, y).shape[-1]
    if ref.resolution and ref.resolution != res:
        raise StatsError(f"{gen_path} makes {res}x{res} images but {ref.path} holds statistics of "
                         f"{ref.resolution}x{ref.resolution} images: a checkpoint of another model/config, "
                         "or reference statistics of another dataset")
    main = [m for m in opts.metrics if m != "intra_fid"]
    if set(opts.metrics) & set(prdc.METRICS):
        if opts.prdc_k < 1:
            raise UsageError(f"--prdc-k must be at least 1, got {opts.prdc_k}")
        if min(opts.num_samples, opts.prdc_num) <= opts.prdc_k:
            raise UsageError(f"precision/recall/density/coverage with --prdc-k {opts.prdc_k} need more than "
                             f"{opts.prdc_k} samples; got --num-samples {opts.num_samples}, --prdc-num {opts.prdc_num}")
        if not ref.has_prdc_features:
            ref.prdc_features(opts.prdc_num)  # raises with the fix
    if main and opts.num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2, got {opts.num_samples}")
    if main and "fid" in main:
        warn_small_n("FID", opts.num_samples, ext.dim)
    if "kid" in opts.metrics and not ref.has_features:
        ref.features()  # raises with the fix
    if "intra_fid" in opts.metrics:
        if num_classes == 0:
            raise UsageError(f"intra_fid needs a conditional generator; {gen_path} is unconditional")
        if ref.num_classes != num_classes:
            raise StatsError(f"{ref.path} has per-class statistics of {ref.num_classes} classes, the generator "
                             f"has {num_classes}; compute them with `python -m eval.reference --per-class`")
        if opts.per_class < 2:
            raise UsageError(f"--per-class must be at least 2, got {opts.per_class}")
        warn_small_n("intra-FID", opts.per_class, ext.dim, per_class=True)
    return res


def warn_small_n(metric: str, n: int, dim: int, per_class: bool = False) -> None:
    """One policy for every metric (as pytorch-fid and torch-fidelity): compute, but say when N is so
    small that the estimate is strongly biased upward. The N used is in every result."""
    if n < dim:
        dist.print0(f"warning: {metric} from {n} samples{' per class' if per_class else ''} with {dim}-dimensional "
                    f"features: the covariance has rank < {dim} and the value is strongly biased upward; compare "
                    f"only numbers computed with the same N (published FIDs use 10000-50000)", file=sys.stderr)


def _run_pass(G, plan: Plan, ext: FeatureExtractor, opts: EvalOptions, ref: ReferenceStats, health: SampleHealth, *,
              per_class: bool, keep_features: bool, keep_logits: bool, feature_index=None):
    """Generate the plan's samples; returns (overall stats, per-class FIDs, features, logits).

    Features are kept (on rank 0) for all samples, or only for ``feature_index`` when given."""
    dev = dist.device()
    row_bytes = (ext.dim * ext.dim + ext.dim + 1) * 8
    group = max(1, CLASS_GROUP_BYTES // row_bytes) if per_class else len(plan.counts)
    overall = SufficientStats(ext.dim, 1, dev)
    class_fid = torch.zeros(len(plan.counts), dtype=torch.float64, device=dev)
    feats, logits = [], []
    offsets = plan.offsets
    for c0, c1 in plan.class_groups(group):
        col = Collector(ext, dev, (c1 - c0) if per_class else 1, keep_features=keep_features,
                        keep_logits=keep_logits, feature_index=feature_index)
        for idx, cls, within in rank_batches(plan, offsets[c0], offsets[c1], opts.batch_size):
            col.add(generate(G, plan, idx, cls, within, dev, health), (cls - c0) if per_class else None, idx)
        res = col.finish()
        overall.add_stats(res.stats.merged())
        if per_class:
            for c in range(c0, c1):
                if c % dist.world_size() == dist.rank():  # spread the per-class FIDs over ranks
                    mu, sigma = res.stats.mean_cov(c - c0)
                    rmu, rsigma, _ = ref.class_stats(c)
                    class_fid[c] = frechet_distance(mu, sigma, rmu, rsigma, device=dev)
        if res.features is not None:
            feats.append(res.features)
        if res.logits is not None:
            logits.append(res.logits)
    if per_class:
        dist.all_reduce_sum_(class_fid)
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return overall, class_fid.cpu().tolist(), cat(feats), cat(logits)


@contextlib.contextmanager
def no_tf32(dev: torch.device) -> Iterator[None]:
    """On CUDA, convolutions and matmuls in full fp32 (reference numbers are fp32 Inception features);
    the process-wide TF32 settings are restored afterwards (a trainer calling the evaluator keeps its own)."""
    if dev.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def evaluate(ckpt: str, ref_path: str, ext: FeatureExtractor, opts: EvalOptions) -> dict:
    """Evaluate one checkpoint. Collective (every rank calls it); returns the results on every rank."""
    with no_tf32(dist.device()):
        return _evaluate(ckpt, ref_path, ext, opts)


def _evaluate(ckpt: str, ref_path: str, ext: FeatureExtractor, opts: EvalOptions) -> dict:
    from models.export import load_generator, read_generator_meta
    t0 = time.time()
    dev = dist.device()
    ckpt = checkpoint_folder(ckpt)
    gen_path, ckpt_meta = resolve_generator(ckpt)
    try:
        if os.path.isdir(ckpt):
            check_run_config(read_generator_meta(gen_path), ckpt)
        G, gmeta = load_generator(gen_path, opts.which, dev)
    except (ValueError, TypeError, RuntimeError) as exc:  # unknown model, wrong shapes, not a generator
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{gen_path}: cannot be evaluated ({exc})") from exc
    ref = load_stats(ref_path)
    num_classes = _num_classes(G, gmeta)
    resolution = _check(G, ref, ext, opts, num_classes, gen_path)
    m = set(opts.metrics)
    prdc_metrics = [x for x in prdc.METRICS if x in m]
    main_metrics = m & ({"fid", "is", "kid"} | set(prdc.METRICS))
    # Features: all N for KID; for precision/recall/density/coverage only an evenly spaced subset.
    keep_features = bool({"kid"} & m or prdc_metrics)
    prdc_index = prdc.spread_subset(opts.num_samples, opts.prdc_num)
    feature_index = None if "kid" in m else torch.from_numpy(prdc_index)
    out = {}
    main_plan = Plan(balanced_counts(opts.num_samples, num_classes), num_classes > 0, opts.seed)
    shared = False
    health = SampleHealth()
    if "intra_fid" in m:
        intra_plan = Plan([opts.per_class] * num_classes, True, opts.seed)
        shared = bool(main_metrics) and intra_plan.counts == main_plan.counts
        overall, class_fid, feats, logits = _run_pass(
            G, intra_plan, ext, opts, ref, health, per_class=True, keep_features=shared and keep_features,
            keep_logits=shared and "is" in m, feature_index=feature_index)
        out["intra_fid"] = mean_of(class_fid)
        out["intra_fid_classes"] = class_fid
    if main_metrics and not shared:
        overall, _, feats, logits = _run_pass(G, main_plan, ext, opts, ref, health, per_class=False,
                                              keep_features=keep_features, keep_logits="is" in m,
                                              feature_index=feature_index)
    health = health.reduce()
    for line in health.warnings():
        dist.print0(f"warning: {gen_path}: {line}; check the samples before trusting the score", file=sys.stderr)
    if prdc_metrics:  # collective: every rank computes its rows' distances
        fake = (feats if feature_index is not None else feats[torch.from_numpy(prdc_index)]) if dist.is_main() else None
        real = torch.from_numpy(ref.prdc_features(opts.prdc_num)) if dist.is_main() else None
        fake, real = prdc.share(fake, dev), prdc.share(real, dev)
        out.update(prdc.prdc(real, fake, opts.prdc_k, prdc_metrics, device=dev))
        out.update(prdc_k=opts.prdc_k, prdc_num_samples=int(fake.shape[0]), prdc_ref_num=int(real.shape[0]))
        del fake, real
    if dist.is_main() and main_metrics:
        if "fid" in m:
            mu, sigma = overall.mean_cov()
            out["fid"] = frechet_distance(mu, sigma, ref.mu, ref.sigma, device=dev)
        if "is" in m:
            out["is"], out["is_std"] = inception_score(logits, opts.is_splits)
        if "kid" in m:
            out["kid"], out["kid_std"] = kernel_inception_distance(
                feats, ref.features(), opts.kid_subsets, opts.kid_subset_size, device=dev)
    out = dist.broadcast_object(out)
    info = gmeta.get("info", {})
    out.update({
        "ckpt": ckpt, "generator": gmeta.get("name"), "which": gmeta.get("which"),
        "step": ckpt_meta.get("step", info.get("step")),
        "images_seen": ckpt_meta.get("images_seen", info.get("images_seen")),
        "num_samples": opts.num_samples if main_metrics else None,
        "per_class": opts.per_class if "intra_fid" in m else None,
        "ref_num_images": ref.n or None, "constant_images": health.constant,
        "resolution": resolution, "extractor": ext.name, "feature_family": ext.family, "ref": ref_path,
        "seed": opts.seed, "world_size": dist.world_size(), "seconds": round(time.time() - t0, 2),
    })
    return out


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", default="fid",
                   help=f"comma-separated subset of {','.join(METRICS)}, or the groups pr (precision,recall), "
                        "dc (density,coverage), prdc (all four)")
    p.add_argument("--num-samples", type=int, default=50000, help="N generated samples for fid/is/kid")
    p.add_argument("--per-class", type=int, default=5000, help="samples per class for intra_fid")
    p.add_argument("--batch-size", type=int, default=100, help="samples per rank per step")
    p.add_argument("--seed", type=int, default=0, help="noise seed (samples do not depend on the rank count)")
    p.add_argument("--which", default="auto", choices=("auto", "G", "G_ema"), help="weights to evaluate")
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--prdc-k", type=int, default=prdc.DEFAULT_K,
                   help="k of the k-NN balls for precision/recall/density/coverage")
    p.add_argument("--prdc-num", type=int, default=prdc.DEFAULT_NUM,
                   help="precision/recall/density/coverage use an evenly spaced subset of at most this many "
                        "generated and reference features (memory and time grow with its square)")
    add_extractor_args(p)


def options_from_args(args) -> EvalOptions:
    return EvalOptions(parse_metrics(args.metrics), args.num_samples, args.per_class, args.batch_size, args.seed,
                       args.which, args.is_splits, args.kid_subsets, args.kid_subset_size, args.prdc_k, args.prdc_num)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (ckpt-<step>/), run folder (its newest complete "
                   "checkpoint) or generator.safetensors")
    p.add_argument("--ref", required=True, help="reference statistics .npz (python -m eval.reference)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    add_eval_args(p)
    args = p.parse_args(argv)
    opts = options_from_args(args)
    dist.init()
    ext = make_extractor(args, need_logits="is" in opts.metrics)
    result = evaluate(args.ckpt, args.ref, ext, opts)
    if dist.is_main():
        text = json.dumps(result)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(text + "\n")
    return 0


def main(argv=None) -> int:
    return cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
