"""Improved precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020).

With real features ``X = {x_i}`` (M_r of them), generated features ``Y = {y_j}`` (M_f) and
``r_k(a; A)`` the Euclidean distance from ``a`` to its k-th nearest neighbour in ``A`` other than
``a`` itself (the k-NN ball of ``a``):

- precision = (1/M_f) #{j : ||y_j - x_i|| <= r_k(x_i; X) for some i}: generated samples inside
  the real manifold (the union of the real k-NN balls);
- recall    = (1/M_r) #{i : ||x_i - y_j|| <= r_k(y_j; Y) for some j}: the same with the roles swapped;
- density   = 1/(k M_f) sum_j #{i : ||y_j - x_i|| < r_k(x_i; X)};
- coverage  = (1/M_r) #{i : min_j ||x_i - y_j|| < r_k(x_i; X)}.

k = 3 by default, as StyleGAN2-ADA's ``pr50k3`` (``nhood_size=3``); density and coverage use the
same k (Naeem et al. suggest k = 5 for their own choice of sample sizes). The boundary follows the
authors' code: a closed ball (``<=``) for precision/recall (Kynkäänniemi et al., StyleGAN2-ADA),
an open one (``<``) for density/coverage (``prdc``, clovaai); the two differ only at exact ties.
"Excluding itself" is by index, so an exact duplicate of a point does count as its neighbour.

Squared distances ``|a|^2 + |b|^2 - 2 a.b`` are computed in float64 (clamped at 0), in blocks of
:data:`BLOCK_ROWS` rows against a whole set, never ``M x M`` at once. The blocks are fixed by the
global row index and every rank takes a contiguous run of whole blocks, so each block is the
same computation whatever the number of ranks; the k-NN radii are combined with one all_reduce
(each entry comes from exactly one rank, the others add zeros) and the results are integer
counts summed with one all_reduce: exactly the numbers of one process.

Memory per rank: both feature sets as float64 on the device (``(M_r + M_f) * d * 8`` bytes:
328 MB for 10k + 10k Inception features) plus one block of distances and its masks
(``BLOCK_ROWS * M * 10`` bytes: 100 MB at M = 10k), so about 0.5 GB for the default 10k.
Compute: three passes of ``M^2 d`` multiply-adds (real-real radii, generated-generated radii,
generated-real), ``6 * 10^11`` for 10k Inception features (108 s on one CPU thread, measured).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer import dist
from trainer.errors import UsageError

METRICS = ("precision", "recall", "density", "coverage")
GROUPS = {"pr": ("precision", "recall"), "dc": ("density", "coverage"), "prdc": METRICS}
DEFAULT_K = 3
DEFAULT_NUM = 10000
BLOCK_ROWS = 1024


def spread_subset(n: int, m: int) -> np.ndarray:
    """``min(n, m)`` evenly spaced indices of ``range(n)``: ``floor(i * n / m)`` for ``i < m``.

    Generated samples are class-major and data sets are often sorted by class, so the first m
    would cover only some classes; an even spread keeps the classes' proportions.
    """
    if m <= 0 or m >= n:
        return np.arange(n, dtype=np.int64)
    return (np.arange(m, dtype=np.int64) * n) // m


def share(t: Optional[torch.Tensor], dev) -> torch.Tensor:
    """Rank 0's tensor on every rank (a no-op for one process); other ranks may pass ``None``."""
    if not (dist.initialized() and dist.world_size() > 1):
        return t.to(dev)
    meta = dist.broadcast_object((tuple(t.shape), str(t.dtype).split(".")[-1]) if dist.is_main() else None)
    out = t.to(dev).contiguous() if dist.is_main() else torch.empty(meta[0], dtype=getattr(torch, meta[1]),
                                                                      device=dev)
    torch.distributed.broadcast(out, src=0)
    return out


def _my_blocks(n: int, block: int) -> Iterable[Tuple[int, int]]:
    """This rank's row blocks ``[r0, r1)``: global blocks of ``block`` rows, a contiguous run of them per rank."""
    starts = list(range(0, n, block))
    b0, b1 = dist.exact_slice(len(starts))
    for s in starts[b0:b1]:
        yield s, min(s + block, n)


def _sqdist(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.t())).clamp_min_(0.0)


def knn_radii_sq(x: torch.Tensor, k: int, block: int = BLOCK_ROWS) -> torch.Tensor:
    """Squared distance of every row of ``x`` (float64) to its k-th nearest other row. Collective:
    each rank computes its blocks; one all_reduce gives the whole vector on every rank."""
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"a k-NN radius with k={k} needs more than {k} feature vectors, got {n}")
    sq = (x * x).sum(1)
    out = torch.zeros(n, dtype=torch.float64, device=x.device)
    for r0, r1 in _my_blocks(n, block):
        d = _sqdist(x[r0:r1], sq[r0:r1], x, sq)
        rows = torch.arange(r1 - r0, device=x.device)
        d[rows, rows + r0] = float("inf")  # not its own neighbour
        out[r0:r1] = torch.topk(d, k, dim=1, largest=False).values[:, k - 1]
    return dist.all_reduce_sum_(out)


def prdc(real, fake, k: int = DEFAULT_K, metrics: Sequence[str] = METRICS, device=None,
         block: int = BLOCK_ROWS) -> Dict[str, float]:
    """The asked subset of precision, recall, density and coverage of ``fake`` against ``real``.

    Collective: every rank calls it with the same ``real`` and ``fake`` (``[M, d]`` arrays or
    tensors; see :func:`share`) and gets the same results.
    """
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UsageError(f"unknown metric(s) {bad}; valid: {', '.join(METRICS)}")
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    dev = torch.device(device) if device is not None else dist.device()
    x = torch.as_tensor(np.asarray(real) if not torch.is_tensor(real) else real).to(dev, torch.float64)
    y = torch.as_tensor(np.asarray(fake) if not torch.is_tensor(fake) else fake).to(dev, torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise UsageError(f"feature sets of different shapes: real {tuple(x.shape)}, generated {tuple(y.shape)}")
    for name, t in (("real", x), ("generated", y)):
        if t.shape[0] <= k:
            raise UsageError(f"precision/recall/density/coverage with k={k} need more than {k} {name} samples, "
                             f"got {t.shape[0]}")
        if not bool(torch.isfinite(t).all()):
            raise UsageError(f"the {name} features hold non-finite values (NaN/inf)")
    want = set(metrics)
    rad_x = knn_radii_sq(x, k, block)
    rad_y = knn_radii_sq(y, k, block) if "recall" in want else None
    x_sq, y_sq = (x * x).sum(1), (y * y).sum(1)
    mr, mf = x.shape[0], y.shape[0]
    # One int64 buffer for one all_reduce: [precision count, density count, recall hits per real,
    # coverage hits per real]; a real is recalled / covered when its hit count is non-zero.
    counts = torch.zeros(2 + 2 * mr, dtype=torch.int64, device=dev)
    recall_hits, coverage_hits = counts[2: 2 + mr], counts[2 + mr:]
    for r0, r1 in _my_blocks(mf, block):
        d = _sqdist(y[r0:r1], y_sq[r0:r1], x, x_sq)          # [generated block, all reals]
        inside_open = d < rad_x[None, :]
        if "precision" in want:
            counts[0] += int((d <= rad_x[None, :]).any(1).sum())
        if "density" in want:
            counts[1] += int(inside_open.sum())
        if "coverage" in want:
            coverage_hits += inside_open.sum(0)
        if "recall" in want:
            recall_hits += (d <= rad_y[r0:r1, None]).sum(0)
    dist.all_reduce_sum_(counts)
    out = {}
    if "precision" in want:
        out["precision"] = int(counts[0]) / mf
    if "recall" in want:
        out["recall"] = int((recall_hits > 0).sum()) / mr
    if "density" in want:
        out["density"] = int(counts[1]) / (k * mf)
    if "coverage" in want:
        out["coverage"] = int((coverage_hits > 0).sum()) / mr
    return {m: out[m] for m in METRICS if m in out}


def expand(names: Sequence[str]) -> Tuple[str, ...]:
    """Metric names with the groups ``pr``, ``dc`` and ``prdc`` replaced by their members, in order, once each."""
    out = []
    for n in names:
        for m in GROUPS.get(n, (n,)):
            if m not in out:
                out.append(m)
    return tuple(out)
