"""Scoring and reporting for ``launch.compare``: the scorer (FID, IS, KID, improved precision and recall,
density and coverage, and the feature variance ratio of N generated or real images against reference
statistics), the "works" verdict, the markdown table and the sample grids. The training side and
the command line are in launch/compare.py.

The "works" criterion (:func:`verdict`): training finished with finite losses, FID below
``--fid-threshold`` and **recall >= ``--min-recall`` (0.25)**, recall being the improved recall of
Kynkäänniemi et al. 2019 with k = 3 (:mod:`eval.prdc`): the fraction of real images inside the
k-NN ball of some generated image. A generator that drops modes of the data loses recall in
proportion, whereas the variance ratio, the criterion before, can stay high for a generator that
covers a few modes spread far apart. 0.25 was fixed before any measurement: below it, three
quarters of the real images have no generated sample near them. Measured afterwards with real
shapes10 images as the "generator" (N = 1000, shapes10-cnn features, the quick mode's): all ten
classes recall 0.95 (variance ratio 1.05), 8 classes 0.75, 5 classes 0.47 (variance ratio 1.09),
2 classes 0.19 (0.26), 1 class 0.09 (0.15): the variance criterion (>= 0.25) passed the sets with 5
and 2 of 10 classes, recall fails the set with 2. The variance ratio and the precision stay columns.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from trainer.errors import EXIT_DIVERGED, EXIT_OK, UsageError


def checkpoint_step(ckpt: str) -> int:
    return int(os.path.basename(ckpt).split("-")[-1])


class Scorer:
    """Features of N generated or real images; FID / IS / KID / variance ratio against the reference.

    KID (Binkowski et al. 2018; unbiased, so usable at small N) needs the reference's features:
    a stats file written with ``eval.reference --keep-features``.
    """

    def __init__(self, ext, n: int, batch_size: int = 100, seed: int = 0, prdc_k: int = 3, prdc_num: int = 10000):
        self.ext, self.n, self.batch_size, self.seed = ext, n, batch_size, seed
        self.prdc_k, self.prdc_num = prdc_k, prdc_num
        self.ref = None            # (mu, sigma)
        self.ref_features = None   # float32 [N_ref, d] or None
        self.ref_prdc = None       # float32 [<= prdc_num, d]: the real side of precision/recall (None: not scored)

    def _collect(self, batches, keep_logits: bool, first: int = 0):
        """Statistics of the batches' images ``[first, first + n)``; features of all (KID) or of the
        precision/recall subset."""
        from eval.collect import Collector
        from trainer.dist import device
        from eval.prdc import spread_subset
        subset = None  # KID: all features; else the precision/recall subset only
        if self.ref_features is None:
            subset = torch.from_numpy(first + spread_subset(self.n, self.prdc_num))
        col = Collector(self.ext, device(), keep_logits=keep_logits and self.ext.num_logits > 0,
                        keep_features=self.ref_features is not None or self.ref_prdc is not None,
                        feature_index=subset)
        for images, index in batches:
            col.add(images, None, index)
        res = col.finish()
        return (*res.stats.mean_cov(), res.logits, res.features)

    def real_stats(self, source, start: int, keep_logits: bool = False):
        """``(mu, sigma, logits or None, features or None)`` of the real images ``[start, start + n)``."""
        return self._collect(((images, index) for images, _, index in
                              source.batches(start, start + self.n, self.batch_size)), keep_logits, start)

    def set_reference(self, source, cache: Optional[str] = None) -> None:
        from eval.statsfile import StatsError, load_stats, save_stats
        from trainer.dist import is_main
        from eval.prdc import spread_subset
        index = spread_subset(self.n, self.prdc_num)
        if cache and os.path.isfile(cache):
            try:
                ref = load_stats(cache)
                if (ref.extractor == self.ext.family and ref.n == self.n and "prdc_index" in ref.keys
                        and np.array_equal(ref._npz["prdc_index"], index)):
                    self.ref = (ref.mu, ref.sigma)
                    self.ref_prdc = ref.prdc_features(self.prdc_num)
                    return
            except StatsError:
                pass
        self.ref_prdc = np.zeros((0, self.ext.dim), np.float32)  # keep the subset's features while collecting
        mu, sigma, _, feats = self.real_stats(source, 0)
        self.ref = (mu, sigma)
        from trainer.dist import device
        from eval.prdc import share
        self.ref_prdc = share(feats, device()).cpu().numpy()
        if cache and is_main():
            save_stats(cache, *self.ref, self.n, extractor=self.ext.family, resolution=source.resolution,
                       info={"note": "eval.compare reference: the first N images"},
                       prdc_features=self.ref_prdc, prdc_index=index)

    def load_reference(self, path: str) -> None:
        from eval.statsfile import load_stats
        ref = load_stats(path)
        ref.check_compatible(self.ext.family, self.ext.dim)
        self.ref = (ref.mu, ref.sigma)
        self.ref_features = ref.features() if ref.has_features else None
        self.ref_prdc = ref.prdc_features(self.prdc_num) if ref.has_prdc_features else None
        self.ref_n = ref.n

    def score(self, mu, sigma, logits: Optional[torch.Tensor] = None, features=None) -> dict:
        from eval.stats import frechet_distance, inception_score, kernel_inception_distance
        out = {"fid": frechet_distance(mu, sigma, *self.ref),
               "variance_ratio": float(np.trace(sigma) / np.trace(self.ref[1]))}
        if self.ref_prdc is not None:  # collective: features are on rank 0, every rank takes part
            from trainer.dist import device, is_main
            from eval.prdc import prdc, share, spread_subset
            fake = None
            if is_main():
                fake = torch.as_tensor(np.asarray(features))
                fake = fake[torch.from_numpy(spread_subset(len(fake), self.prdc_num))]
            out.update(prdc(share(torch.from_numpy(self.ref_prdc), device()), share(fake, device()), self.prdc_k))
        if logits is not None:
            out["is"], out["is_std"] = inception_score(logits, 10)
        if features is not None and self.ref_features is not None:
            size = min(1000, len(features), len(self.ref_features))
            out["kid"], out["kid_std"] = kernel_inception_distance(features, self.ref_features, 100, size)
        return out

    def generated(self, gen_path: str) -> dict:
        from trainer.dist import device
        from eval.generate import Plan, SampleHealth, balanced_counts, generate, rank_batches
        from models.export import load_generator
        G, _ = load_generator(gen_path, device=device())
        k = int(getattr(G, "num_classes", 0) or 0)
        plan = Plan(balanced_counts(self.n, k), k > 0, self.seed)
        health = SampleHealth()
        batches = ((generate(G, plan, idx, cls, within, device(), health), idx)
                   for idx, cls, within in rank_batches(plan, 0, plan.total, self.batch_size))
        out = self.score(*self._collect(batches, keep_logits=True))
        out["constant_images"] = health.reduce().constant
        return out


# A row's ``exit`` is its trainer's exit status (trainer.errors.EXIT_*) or one of these:
NO_FINAL_CHECKPOINT = -1   # the trainer reported success, but the final checkpoint is missing
TRAINER_RAISED = -2        # training in this process raised (``error`` holds the exception)


@dataclass
class RowResult:
    """One row of a study: what it trained, how training ended, its scores and its verdict (one
    element of ``compare.json``'s ``rows``, flattened by :meth:`to_json`)."""
    name: str
    exp: str
    loss: str
    constraint: str
    n_dis: int
    steps: int                                   # G steps: the budget, then the final checkpoint's step
    run_dir: str
    overrides: List[str]
    exit: Optional[int] = None                   # None: not trained yet
    error: Optional[str] = None
    train_seconds: Optional[float] = None
    ckpt: Optional[str] = None                   # the final checkpoint
    scores: Dict[str, Any] = field(default_factory=dict)   # fid, is, kid, precision, recall, ... (Scorer.score)
    verdict: str = ""
    grid: Optional[str] = None                   # OUT/grids/<exp>.png, relative to OUT

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items()
               if k != "scores" and not (k in ("error", "grid") and v is None)}
        out.update(self.scores)
        return out


def verdict(r: RowResult, threshold: float, min_recall: float) -> str:
    """The "works" criterion: finite losses, FID < ``threshold``, recall >= ``min_recall`` (see the module doc)."""
    if r.exit != EXIT_OK:
        if r.exit == EXIT_DIVERGED:
            return "does not work (diverged: non-finite loss)"
        return f"failed ({r.error})" if r.error is not None else f"failed (trainer exit {r.exit})"
    fid = r.scores.get("fid", math.inf)
    if not math.isfinite(fid):
        return "does not work (non-finite FID)"
    recall = r.scores.get("recall")
    if recall is None:
        return "failed (no recall: scored without the reference's features)"
    if recall < min_recall:
        return f"does not work (collapsed: recall {recall:.2f} < {min_recall:g})"
    if fid >= threshold:
        return f"does not work (FID >= {threshold:g})"
    return "works"


def table(rows: Sequence[RowResult], args, floor: Optional[dict]) -> str:
    has_is = any("is" in r.scores for r in rows) or bool(floor and "is" in floor)
    has_kid = any("kid" in r.scores for r in rows) or bool(floor and "kid" in floor)
    has_score_s = any(r.scores.get("score_seconds") for r in rows)
    head = ["row", "experiment", "loss", "D constraint", "n_dis", "G steps", "train s"]
    head += ["score s"] if has_score_s else []
    head += [f"FID ({args.extractor})"]
    head += ["KID x 1000"] if has_kid else []
    head += [f"IS ({args.extractor})"] if has_is else []
    head += ["precision", "recall", "var. ratio", "works?"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def fmt(x, spec):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    def kid(r):
        if r.get("kid") is None:
            return "n/a"
        return f"{1000 * r['kid']:.2f} ± {1000 * r.get('kid_std', 0):.2f}"

    if floor is not None:
        cells = [floor.get("name", "real data (held-out N)"), "-", "-", "-", "-", "-", "-"]
        cells += ["-"] if has_score_s else []
        cells += [fmt(floor["fid"], ".2f")]
        cells += [kid(floor)] if has_kid else []
        cells += [fmt(floor.get("is"), ".2f")] if has_is else []
        cells += [fmt(floor.get("precision"), ".2f"), fmt(floor.get("recall"), ".2f")]
        cells += [fmt(floor["variance_ratio"], ".2f"), "(reference)"]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        sc = r.scores
        cells = [r.name, f"`{r.exp}`", r.loss, r.constraint, str(r.n_dis), str(r.steps), fmt(r.train_seconds, ".0f")]
        cells += [fmt(sc.get("score_seconds"), ".0f")] if has_score_s else []
        cells += [fmt(sc.get("fid"), ".2f")]
        cells += [kid(sc)] if has_kid else []
        cells += [fmt(sc.get("is"), ".2f")] if has_is else []
        cells += [fmt(sc.get("precision"), ".2f"), fmt(sc.get("recall"), ".2f")]
        cells += [fmt(sc.get("variance_ratio"), ".2f"), r.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    mode = "quick (CPU)" if args.quick else "full"
    lines.append("")
    lines.append(f"Mode {mode}; {args.num_samples} samples per row; extractor `{args.extractor}`. Works = training "
                 f"finished with finite losses, FID < {args.fid_threshold:g} and recall >= {args.min_recall:g} "
                 f"(no collapse; improved precision/recall, Kynkäänniemi et al. 2019, k = 3, on at most "
                 f"{min(args.num_samples, 10000)} features of each side). Var. ratio = tr(Sigma_g)/tr(Sigma_r).")
    sizing = []
    if getattr(args, "width_scale", 0):
        sizing.append(f"every row's G and D widths x {args.width_scale:g}")
    if getattr(args, "batch_scale", 0):
        sizing.append(f"every row's D and G batch x {args.batch_scale:g}")
    if sizing:
        lines.append("Sized for the CPU: " + ", ".join(sizing) + ".")
    if args.overrides:
        lines.append("Every row trained with " + ", ".join(f"`{o}`" for o in args.overrides) + ".")
    if args.quick:
        lines.append(f"FID at N={args.num_samples} is biased upward (see the real-data row) and comparable only "
                     "within this table.")
    return "\n".join(lines)


def copy_grids(results: List[RowResult], out: str) -> None:
    """Each row's last sample grid (written by the trainer at its final step) into OUT/grids/<exp>.png."""
    import shutil
    folder = os.path.join(out, "grids")
    os.makedirs(folder, exist_ok=True)
    for r in results:
        if r.ckpt is None:
            continue
        grid = os.path.join(r.run_dir, "samples", f"step-{checkpoint_step(r.ckpt):09d}.png")
        if os.path.isfile(grid):
            shutil.copyfile(grid, os.path.join(folder, f"{r.exp}.png"))
            r.grid = os.path.join("grids", f"{r.exp}.png")


def make_scorer(args, rows: Sequence):
    """The scorer with its reference statistics, and the real-data row (or None)."""
    from trainer import dist
    from eval.data import open_source
    from eval.extractors import build_extractor
    from trainer.config import load_config
    dist.init()
    ext = build_extractor(args.extractor, dist.device(), need_logits=False)
    scorer = Scorer(ext, args.num_samples, seed=args.seed)
    if args.ref:
        scorer.load_reference(args.ref)
        if scorer.ref_prdc is None:
            raise UsageError(f"--ref {args.ref} holds no features, which the 'works' criterion's recall needs; "
                             "recompute it with `python -m eval.reference ... --prdc-features 10000` "
                             "(or --keep-features)")
        floor = None
        if args.floor_data and not args.no_floor:
            n_floor = len(open_source(args.floor_data))  # a bad --floor-data fails before any scoring
            if n_floor < args.num_samples:
                raise UsageError(f"--floor-data {args.floor_data} has {n_floor} images, fewer than "
                                 f"--num-samples {args.num_samples}")
            floor = lambda: real_floor(scorer, args)  # noqa: E731  (scored after the rows, cached)
        return scorer, floor
    data = "synthetic:32" if args.quick else (args.data_path or load_config(rows[0].exp).data.path)
    source = open_source(data)
    if len(source) < args.num_samples:
        raise UsageError(f"{data} has {len(source)} images, fewer than --num-samples {args.num_samples}")
    safe = ext.family.replace("/", "_")
    scorer.set_reference(source, os.path.join(args.out, f"reference-{safe}-{args.num_samples}.npz"))
    floor = None
    if not args.no_floor and len(source) >= 2 * args.num_samples:
        floor = scorer.score(*scorer.real_stats(source, args.num_samples, keep_logits=True))
    return scorer, floor


def settings_tag(settings: dict) -> str:
    """The short hash that names a cached score (``score-<tag>.json``, ``floor-<tag>.json``)."""
    import hashlib
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def real_floor(scorer: Scorer, args) -> dict:
    """The real-data row: N images of ``--floor-data`` against the reference statistics, cached in
    OUT/floor-<settings>.json like a row's score, so an interrupted study never computes it twice."""
    from trainer import dist
    from eval.data import open_source
    settings = {"extractor": scorer.ext.family, "n": scorer.n, "seed": scorer.seed, "ref": args.ref or "",
                "data": args.floor_data, "kid": scorer.ref_features is not None,
                "prdc": [scorer.prdc_k, scorer.prdc_num]}
    tag = settings_tag(settings)
    cache = os.path.join(args.out, f"floor-{tag}.json")
    if os.path.isfile(cache):
        with open(cache) as fh:
            floor = json.load(fh)
    else:
        source = open_source(args.floor_data)
        t0 = time.time()
        floor = scorer.score(*scorer.real_stats(source, 0, keep_logits=True))
        floor["name"] = f"real data ({args.num_samples} of {args.floor_data.rstrip('/').split('/')[-1]})"
        floor["score_seconds"] = time.time() - t0
        floor["settings"] = settings
        if dist.is_main():
            with open(cache, "w") as fh:
                json.dump(floor, fh)
    print(f"[compare] real-data floor: FID {floor['fid']:.2f} ({floor['score_seconds']:.0f}s)", flush=True)
    return floor


def score_rows(results: List[RowResult], scorer: Scorer, args) -> None:
    """Score every trained row; a row's score is cached in its run folder (score-<settings>.json), so
    an interrupted comparison does not score a row twice."""
    from trainer import dist
    settings = {"extractor": scorer.ext.family, "n": scorer.n, "seed": scorer.seed, "ref": args.ref or "",
                "kid": scorer.ref_features is not None, "prdc": [scorer.prdc_k, scorer.prdc_num]}
    tag = settings_tag(settings)
    for r in results:
        if r.exit == EXIT_OK:
            cache = os.path.join(r.run_dir, f"score-{tag}.json")
            cached = None
            if os.path.isfile(cache):
                with open(cache) as fh:
                    cached = json.load(fh)
                if cached.get("ckpt") != r.ckpt:
                    cached = None
            if cached is None:
                t0 = time.time()
                cached = scorer.generated(os.path.join(r.ckpt, "generator.safetensors"))
                cached.update(ckpt=r.ckpt, score_seconds=time.time() - t0, settings=settings)
                if dist.is_main():
                    with open(cache, "w") as fh:
                        json.dump(cached, fh)
            r.scores.update({k: v for k, v in cached.items() if k not in ("ckpt", "settings")})
            print(f"[compare] {r.name}: FID {r.scores['fid']:.2f} ({r.scores['score_seconds']:.0f}s)", flush=True)
        r.verdict = verdict(r, args.fid_threshold, args.min_recall)
