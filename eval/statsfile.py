"""Reference statistics files (``.npz``), readable by pytorch-fid and torch-fidelity.

Keys: ``mu`` (float64 ``[d]``), ``sigma`` (float64 ``[d, d]``), which is all pytorch-fid reads,
plus ``n``, ``format``, ``extractor`` (feature family), ``dim``, ``resolution``, ``cache_key`` and
``info`` (JSON). Optional: ``features`` (float32 ``[n, d]``, kept for KID, also used for
precision/recall/density/coverage), ``prdc_features`` (float32 ``[m, d]``, the features of an evenly
spaced subset of m of the n images, ``prdc_index`` int64 ``[m]`` their indices: enough for
precision/recall/density/coverage at a fraction of the size of all features), and per-class
statistics for intra-FID: ``class_n`` ``[C]``, ``class_mu`` ``[C, d]`` and one ``class_sigma_<c>``
per class. The file is written entry by entry (no need to hold every per-class covariance in
memory at once) into a temporary file that is renamed into place, and ``np.load`` reads entries
lazily, so an intra-FID evaluation loads one class covariance at a time.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Iterable, Optional, Tuple

import numpy as np

from trainer.errors import BadInput

FORMAT = "sngan-fid-stats/1"


class StatsError(BadInput, ValueError):
    """A statistics file that is missing, unreadable or does not fit the evaluation."""


def check_moments(mu: np.ndarray, sigma: np.ndarray, where: str, rtol: float = 1e-6) -> None:
    """Refuse statistics that no set of images can have: non-finite values, a covariance that is not
    symmetric or not positive semi-definite (beyond rounding), mismatched dimensions.

    PSD is tested with one Cholesky of ``sigma + tol * I`` (``tol`` = ``rtol`` times the mean
    variance): it succeeds exactly when no eigenvalue is below ``-tol``, at a fraction of the cost of
    an eigendecomposition (0.1 s for 2048 dimensions).
    """
    import torch
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatsError(f"{where}: mu {mu.shape} and sigma {sigma.shape} do not form statistics")
    if not np.isfinite(mu).all():
        raise StatsError(f"{where}: mu holds {int((~np.isfinite(mu)).sum())} non-finite value(s) (NaN/inf); "
                         f"recompute the statistics")
    if not np.isfinite(sigma).all():
        raise StatsError(f"{where}: sigma holds {int((~np.isfinite(sigma)).sum())} non-finite value(s) (NaN/inf); "
                         f"recompute the statistics")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * scale:
        raise StatsError(f"{where}: sigma is not symmetric (largest |S - S^T| = {asym:.3g}); not a covariance")
    d = sigma.shape[0]
    tol = rtol * max(float(np.trace(sigma)) / d, 1e-300) + 1e-12 * scale
    t = torch.from_numpy(np.ascontiguousarray(sigma, dtype=np.float64))
    _, info = torch.linalg.cholesky_ex(t + tol * torch.eye(d, dtype=torch.float64))
    if int(info) != 0:
        low = float(torch.linalg.eigvalsh(t).min())
        raise StatsError(f"{where}: sigma is not positive semi-definite (smallest eigenvalue {low:.4g}); not a "
                         f"covariance: recompute the statistics")


def _write_entry(zf: zipfile.ZipFile, name: str, value) -> None:
    with zf.open(name + ".npy", "w", force_zip64=True) as fh:
        np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, n: int, *, extractor: str, resolution: int,
               cache_key: str = "", info: Optional[dict] = None, features: Optional[np.ndarray] = None,
               class_stats: Optional[Iterable[Tuple[int, np.ndarray, np.ndarray, int]]] = None,
               num_classes: int = 0, prdc_features: Optional[np.ndarray] = None,
               prdc_index: Optional[np.ndarray] = None) -> None:
    """Write a stats file atomically; ``class_stats`` yields ``(c, mu_c, sigma_c, n_c)`` lazily."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in (("mu", np.asarray(mu, np.float64)), ("sigma", np.asarray(sigma, np.float64)),
                           ("n", np.int64(n)), ("format", np.str_(FORMAT)), ("extractor", np.str_(extractor)),
                           ("dim", np.int64(len(mu))), ("resolution", np.int64(resolution)),
                           ("cache_key", np.str_(cache_key)), ("info", np.str_(json.dumps(info or {})))):
            _write_entry(zf, key, value)
        if features is not None:
            _write_entry(zf, "features", np.asarray(features, np.float32))
        if prdc_features is not None:
            if prdc_index is None or len(prdc_index) != len(prdc_features):
                raise ValueError("prdc_features need their image indices (prdc_index), one per row")
            _write_entry(zf, "prdc_features", np.asarray(prdc_features, np.float32))
            _write_entry(zf, "prdc_index", np.asarray(prdc_index, np.int64))
        if class_stats is not None:
            class_n = np.zeros(num_classes, np.int64)
            class_mu = np.zeros((num_classes, len(mu)), np.float64)
            for c, mu_c, sigma_c, n_c in class_stats:
                class_n[c], class_mu[c] = n_c, mu_c
                _write_entry(zf, f"class_sigma_{c}", np.asarray(sigma_c, np.float64))
            _write_entry(zf, "class_n", class_n)
            _write_entry(zf, "class_mu", class_mu)
    os.replace(tmp, path)


class ReferenceStats:
    """A loaded stats file; large entries (features, class covariances) are read on demand."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise StatsError(f"reference statistics {path!r} do not exist; compute them with "
                             f"`python -m eval.reference --data ... --out {path}`")
        try:
            self._npz = np.load(path, allow_pickle=False)
            keys = set(self._npz.files)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise StatsError(f"{path}: not a readable .npz statistics file ({exc})") from exc
        if not {"mu", "sigma"} <= keys:
            raise StatsError(f"{path}: has no 'mu'/'sigma' entries (it holds {sorted(keys)})")
        self.path, self.keys = path, keys
        try:
            self.mu = np.asarray(self._npz["mu"], np.float64)
            self.sigma = np.asarray(self._npz["sigma"], np.float64)
        except (ValueError, TypeError, OSError, zipfile.BadZipFile) as exc:
            raise StatsError(f"{path}: mu/sigma unreadable ({exc})") from exc
        check_moments(self.mu, self.sigma, path)
        self.dim = self.mu.shape[0]
        get = lambda k, default: self._npz[k].item() if k in keys else default  # noqa: E731
        self.n = int(get("n", 0))
        self.extractor = str(get("extractor", ""))      # "" for files from other tools
        self.resolution = int(get("resolution", 0))
        self.cache_key = str(get("cache_key", ""))
        self.info = json.loads(get("info", "{}"))
        self.num_classes = int(self._npz["class_n"].shape[0]) if "class_n" in keys else 0
        if self.num_classes and "class_mu" in keys:
            class_mu = np.asarray(self._npz["class_mu"], np.float64)
            if class_mu.shape != (self.num_classes, self.dim) or not np.isfinite(class_mu).all():
                raise StatsError(f"{path}: the per-class means have shape {class_mu.shape} or non-finite values; "
                                 f"recompute them with `python -m eval.reference --per-class`")

    @property
    def has_features(self) -> bool:
        return "features" in self.keys

    def features(self) -> np.ndarray:
        if not self.has_features:
            raise StatsError(f"{self.path}: holds no features, which KID needs; recompute it with "
                             "`python -m eval.reference ... --keep-features`")
        return np.asarray(self._npz["features"], np.float32)

    @property
    def has_prdc_features(self) -> bool:
        return "prdc_features" in self.keys or self.has_features

    def prdc_features(self, m: int) -> np.ndarray:
        """The reference side of precision/recall/density/coverage: an evenly spaced subset of at most
        ``m`` rows of ``prdc_features`` when the file has them, else of ``features``."""
        from .prdc import spread_subset
        key = "prdc_features" if "prdc_features" in self.keys else "features"
        if key not in self.keys:
            raise StatsError(f"{self.path}: holds no features, which precision/recall/density/coverage need; "
                             "recompute it with `python -m eval.reference ... --prdc-features 10000` (or "
                             "--keep-features, all of them)")
        try:
            feats = self._npz[key]
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise StatsError(f"{self.path}: {key} unreadable ({exc})") from exc
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise StatsError(f"{self.path}: {key} has shape {feats.shape}, not [N, {self.dim}]; recompute the file")
        feats = np.asarray(feats[spread_subset(feats.shape[0], m)], np.float32)
        if not np.isfinite(feats).all():
            raise StatsError(f"{self.path}: {key} hold non-finite values (NaN/inf); recompute the file")
        return feats

    def class_stats(self, c: int) -> Tuple[np.ndarray, np.ndarray, int]:
        if not 0 <= c < self.num_classes:
            raise StatsError(f"{self.path}: has no statistics of class {c} (it has {self.num_classes} classes)")
        n = int(self._npz["class_n"][c])
        mu = np.asarray(self._npz["class_mu"][c], np.float64)
        sigma = np.asarray(self._npz[f"class_sigma_{c}"], np.float64)
        check_moments(mu, sigma, f"{self.path} (class {c})")
        return mu, sigma, n

    def check_compatible(self, family: str, dim: int) -> None:
        """Refuse statistics of another feature extractor or dimension, naming both."""
        if self.extractor and self.extractor != family:
            raise StatsError(f"{self.path}: computed with extractor {self.extractor!r}, but this evaluation "
                             f"uses {family!r}; recompute the reference or pick the matching --extractor")
        if self.dim != dim:
            raise StatsError(f"{self.path}: has {self.dim}-dimensional statistics, but extractor {family!r} "
                             f"gives {dim}-dimensional features")


def load_stats(path: str) -> ReferenceStats:
    return ReferenceStats(path)
