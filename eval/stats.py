"""Feature statistics and the metrics computed from them: FID, intra-FID, KID, IS.

Distributed statistics follow ARCHITECTURE.md practice 5 (edm's ``fid.py``): every rank keeps float64
sufficient statistics ``sum f``, ``sum f f^T`` and a count for each group (the whole set, or one
group per class for intra-FID), packed in one buffer that a single all_reduce sums exactly. Mean
and (unbiased, ``n - 1``) covariance follow, as ``numpy.cov`` gives them to pytorch-fid and
torch-fidelity.

Memory: ``groups * (d*d + d + 1) * 8`` bytes per rank, 33.6 MB per group for Inception (d=2048).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from trainer import dist
from trainer.errors import UsageError


class SufficientStats:
    """float64 ``[groups, d*d + d + 1]``: per group the flattened ``sum f f^T``, ``sum f``, count."""

    def __init__(self, dim: int, groups: int = 1, device="cpu"):
        self.dim, self.groups = dim, groups
        self.buf = torch.zeros(groups, dim * dim + dim + 1, dtype=torch.float64, device=device)

    def add(self, feats: torch.Tensor, group: Optional[torch.Tensor] = None) -> None:
        """Add features ``[B, d]``; ``group`` (int64 ``[B]``, values < groups) when groups > 1."""
        f = feats.to(self.buf.device, torch.float64)
        d = self.dim
        if self.groups == 1:
            self.buf[0, : d * d] += (f.t() @ f).flatten()
            self.buf[0, d * d: d * d + d] += f.sum(0)
            self.buf[0, -1] += f.shape[0]
            return
        group = group.to(self.buf.device)
        for g in torch.unique(group).tolist():
            fg = f[group == g]
            self.buf[g, : d * d] += (fg.t() @ fg).flatten()
            self.buf[g, d * d: d * d + d] += fg.sum(0)
            self.buf[g, -1] += fg.shape[0]

    def all_reduce_(self) -> "SufficientStats":
        """Exact statistics over all ranks: one all_reduce of the packed buffer."""
        dist.all_reduce_sum_(self.buf)
        return self

    def count(self, g: int = 0) -> int:
        return int(self.buf[g, -1].item())

    def merged(self) -> "SufficientStats":
        """All groups summed into one (the statistics of the union)."""
        out = SufficientStats(self.dim, 1, self.buf.device)
        out.buf[0] = self.buf.sum(0)
        return out

    def add_stats(self, other: "SufficientStats") -> None:
        self.buf += other.buf.to(self.buf.device)

    def mean_cov(self, g: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (float64 numpy) of group ``g``."""
        d, n = self.dim, self.count(g)
        if n < 2:
            raise UsageError(f"statistics of {n} sample(s) have no covariance; need at least 2")
        row = self.buf[g].cpu()
        mu = row[d * d: d * d + d] / n
        sigma = (row[: d * d].view(d, d) - n * torch.outer(mu, mu)) / (n - 1)
        sigma = 0.5 * (sigma + sigma.t())
        return mu.numpy(), sigma.numpy()


def _psd_factor(s: torch.Tensor) -> torch.Tensor:
    """``F`` with ``S = F F^T`` for symmetric PSD ``S``, also when ``S`` is singular.

    Cholesky when ``S`` is positive definite; otherwise LAPACK's pivoted Cholesky (``?pstrf``,
    ``P^T S P = L L^T`` with ``L`` of the numerical rank), which is exact for PSD matrices of any
    rank (fewer samples than dimensions, a collapsed generator) and as cheap as a Cholesky.
    """
    chol, info = torch.linalg.cholesky_ex(s)
    if int(info) == 0:
        return chol
    from scipy.linalg.lapack import dpstrf
    c, piv, rank, info = dpstrf(s.cpu().numpy(), tol=-1.0, lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
    factor = np.zeros((s.shape[0], rank))
    factor[piv - 1] = np.tril(c)[:, :rank]
    return torch.from_numpy(factor).to(s.device)


def _trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2: the sum of square roots of eig(S1 S2).

    With S1 = F F^T, the non-zero eigenvalues of S1 S2 are those of the symmetric PSD matrix
    F^T S2 F, which need no eigenvectors: a (pivoted) Cholesky, two products and one eigvalsh,
    several times faster than the non-symmetric eigenvalues or scipy's sqrtm.
    """
    f = _psd_factor(s1)
    m = f.t() @ s2 @ f
    return torch.linalg.eigvalsh(0.5 * (m + m.t())).clamp_min(0).sqrt().sum()


def frechet_distance(mu1, sigma1, mu2, sigma2, device="cpu") -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))  (Heusel et al. 2017, eq. 6).

    Computed in float64 via a symmetric eigenvalue problem (:func:`_trace_sqrt_product`); tiny
    negative eigenvalues count as zero, as in torch-fidelity.
    """
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64, device=device)  # noqa: E731
    mu1, mu2, s1, s2 = t(mu1), t(mu2), t(sigma1), t(sigma2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise UsageError(f"statistics of different dimensions: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    s1, s2 = 0.5 * (s1 + s1.t()), 0.5 * (s2 + s2.t())
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * _trace_sqrt_product(s1, s2))


def inception_score(logits: torch.Tensor, splits: int = 10, shuffle_seed: Optional[int] = 2020) -> Tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, mean and std over splits (Salimans et al. 2016).

    Samples are shuffled with ``RandomState(shuffle_seed)`` before splitting, as torch-fidelity
    does, so both report the same number for the same logits.
    """
    n = logits.shape[0]
    if n < splits:
        raise UsageError(f"IS with {splits} splits needs at least {splits} samples, got {n}")
    x = logits.double().cpu()
    if shuffle_seed is not None:
        x = x[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    logp = torch.log_softmax(x, dim=1)
    scores = []
    for i in range(splits):
        part = logp[i * n // splits: (i + 1) * n // splits]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _mmd2_unbiased_poly(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018, KID)."""
    m, d = x.shape
    kxx = (x @ x.t() / d + 1) ** 3
    kyy = (y @ y.t() / d + 1) ** 3
    kxy = (x @ y.t() / d + 1) ** 3
    off = lambda k: k.sum() - torch.diagonal(k).sum()  # noqa: E731
    return float((off(kxx) + off(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def kernel_inception_distance(f1, f2, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020, device="cpu") -> Tuple[float, float]:
    """KID mean and std over ``subsets`` random subsets of ``subset_size`` from each set.

    Subsets are drawn without replacement with ``RandomState(seed).choice`` in torch-fidelity's
    order, so both give the same subsets; kernels are computed in float64.
    """
    f1 = torch.as_tensor(np.asarray(f1), dtype=torch.float64, device=device)
    f2 = torch.as_tensor(np.asarray(f2), dtype=torch.float64, device=device)
    n1, n2 = f1.shape[0], f2.shape[0]
    if min(n1, n2) < subset_size:
        raise UsageError(f"KID subset size {subset_size} is larger than a feature set ({n1} generated, "
                         f"{n2} reference); lower --kid-subset-size or use more samples")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        i1 = torch.from_numpy(rng.choice(n1, subset_size, replace=False)).to(device)
        i2 = torch.from_numpy(rng.choice(n2, subset_size, replace=False)).to(device)
        values.append(_mmd2_unbiased_poly(f1[i1], f2[i2]))
    return float(np.mean(values)), float(np.std(values))


def mean_of(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))
