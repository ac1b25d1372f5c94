"""Samples to evaluate: which labels, which noise, which rank makes which sample.

A *plan* lists the samples of one evaluation in class-major order: class 0's samples, then class
1's, ... (one block for an unconditional model). Sample ``j`` of class ``c`` gets the noise
``z ~ N(0, I)`` drawn from a generator seeded by ``(seed, c, j)``, so every sample is a pure
function of the plan and the seed, whatever the number of ranks or the batch size. Ranks take
disjoint, exact, contiguous slices of a block of samples (no padding duplicates; the total is
exactly N); conditional models get balanced labels (class counts differ by at most one).

Images leave the generator in [-1, 1] and are quantised to uint8 as a PNG dump would be:
``round(127.5 * x + 127.5)`` clamped to [0, 255] (the StyleGAN/EDM convention), so generated and
real images reach the feature extractor the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer.errors import BadInput, UsageError

from trainer import dist


def balanced_counts(n: int, num_classes: int) -> List[int]:
    """``n`` samples over classes: ``n // C`` each, the first ``n % C`` classes one more."""
    if num_classes <= 0:
        return [n]
    return [n // num_classes + (1 if c < n % num_classes else 0) for c in range(num_classes)]


@dataclass
class Plan:
    counts: List[int]      # samples per class (one entry, the total, when unconditional)
    conditional: bool
    seed: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def offsets(self) -> List[int]:
        return [0] + list(np.cumsum(self.counts))

    def class_groups(self, group_size: int) -> List[Tuple[int, int]]:
        """Consecutive class ranges ``[c0, c1)`` of at most ``group_size`` classes."""
        k = len(self.counts)
        return [(c, min(c + group_size, k)) for c in range(0, k, group_size)]


def sample_noise(seed: int, classes: Sequence[int], within: Sequence[int], z_dim: int,
                 z_dist: str = "normal") -> torch.Tensor:
    """``[B, z_dim]`` noise, row b a pure function of ``(seed, classes[b], within[b])``, from G's
    latent distribution (``z_dist``: normal N(0, I), or uniform U[-1, 1) for chainer-gan-lib's CNN)."""
    from models import sample_z
    out = torch.empty(len(classes), z_dim)
    g = torch.Generator()
    for b, (c, j) in enumerate(zip(classes, within)):
        s = np.random.SeedSequence([seed, int(c), int(j)]).generate_state(2, np.uint32)
        g.manual_seed(int(s[0]) << 32 | int(s[1]))
        out[b] = sample_z(1, z_dim, z_dist, generator=g)[0]
    return out


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


def rank_batches(plan: Plan, start: int, end: int, batch_size: int
                 ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's part of the plan's samples ``[start, end)`` (global, class-major indices).

    Yields ``(global_index, class, index_within_class)`` int64 tensors per batch.
    """
    s, e = dist.exact_slice(end - start)
    offsets = torch.tensor(plan.offsets, dtype=torch.int64)
    for b0 in range(start + s, start + e, batch_size):
        idx = torch.arange(b0, min(b0 + batch_size, start + e), dtype=torch.int64)
        cls = torch.searchsorted(offsets, idx, right=True) - 1
        yield idx, cls, idx - offsets[cls]


class NonFiniteSamples(BadInput, ValueError):
    """The generator produced NaN/inf pixels: its weights are garbage and nothing is scored on them."""


class SampleHealth:
    """Counts what a score should not hide: saturated pixels and constant (blank) images."""

    def __init__(self):
        self.images = 0
        self.constant = 0
        self.saturated = 0.0   # sum over images of the fraction of pixels at |x| >= 0.99

    def add(self, x: torch.Tensor) -> None:
        flat = x.flatten(1)
        self.images += flat.shape[0]
        self.constant += int((flat.amax(1) - flat.amin(1) < 2.0 / 255).sum())
        self.saturated += float((flat.abs() >= 0.99).float().mean(1).sum())

    def reduce(self) -> "SampleHealth":
        t = torch.tensor([self.images, self.constant, self.saturated], dtype=torch.float64, device=dist.device())
        dist.all_reduce_sum_(t)
        out = SampleHealth()
        out.images, out.constant, out.saturated = int(t[0]), int(t[1]), float(t[2])
        return out

    def warnings(self) -> list:
        if not self.images:
            return []
        out = []
        if self.constant:
            out.append(f"{self.constant} of {self.images} generated images are constant (one colour)")
        frac = self.saturated / self.images
        if frac > 0.5:
            out.append(f"{100 * frac:.0f}% of generated pixels are saturated (|x| >= 0.99)")
        return out


@torch.no_grad()
def generate(G, plan: Plan, idx: torch.Tensor, cls: torch.Tensor, within: torch.Tensor,
             device, health: Optional[SampleHealth] = None) -> torch.Tensor:
    """uint8 images of the given samples; refuses non-finite generator output."""
    z = sample_noise(plan.seed, cls.tolist(), within.tolist(), G.z_dim, getattr(G, "z_dist", "normal")).to(device)
    y: Optional[torch.Tensor] = cls.to(device) if plan.conditional else None
    x = G(z, y)
    if x.dim() != 4 or x.shape[1] != 3:
        raise UsageError(f"generator returned {tuple(x.shape)}, expected images [B, 3, R, R]")
    x = x.float()
    bad = ~torch.isfinite(x)
    if bad.any():
        raise NonFiniteSamples(f"the generator produced non-finite pixels (NaN/inf) in {int(bad.flatten(1).any(1).sum())} "
                               f"of {x.shape[0]} images (samples {int(idx[0])}..{int(idx[-1])}): its weights are "
                               f"broken; nothing is scored")
    if health is not None:
        health.add(x)
    return to_uint8(x)
