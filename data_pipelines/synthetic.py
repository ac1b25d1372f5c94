"""The embedded dataset: "shapes10", procedurally generated class-conditional images.

Ten classes, each a (shape, colour) pair that a person recognises at a glance: a red circle, an
orange square, a yellow triangle, a green cross, a cyan ring, a blue square, a violet circle, a
magenta triangle, a white cross and a lime ring. Position, size, shade and the background vary per
image. Image ``i`` is a pure function of ``(seed, i)`` and its class is ``i % 10``, so the dataset
needs no download and no files, and any index can be regenerated exactly (neighbour search,
reference statistics).

The training stream walks a per-epoch permutation of the indices, sliced by *global* rank, so ranks
see disjoint data; ``start_batch`` resumes exactly where a run stopped.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence, Tuple

import numpy as np
import torch

from .config import DataConfig
from .stream import register_backend

NUM_CLASSES = 10
CLASS_NAMES = ("red circle", "orange square", "yellow triangle", "green cross", "cyan ring",
               "blue square", "violet circle", "magenta triangle", "white cross", "lime ring")
# shape ids: 0 circle, 1 square, 2 triangle, 3 cross, 4 ring
_SHAPES = (0, 1, 2, 3, 4, 1, 0, 2, 3, 4)
_COLOURS = torch.tensor([
    [0.95, 0.15, 0.15], [1.00, 0.55, 0.05], [0.95, 0.90, 0.10], [0.10, 0.75, 0.20],
    [0.10, 0.85, 0.90], [0.15, 0.30, 0.95], [0.60, 0.25, 0.90], [0.95, 0.20, 0.75],
    [0.95, 0.95, 0.95], [0.60, 0.95, 0.20]])


def _params(seed: int, indices: Sequence[int]) -> np.ndarray:
    """Per-image random parameters, each a pure function of (seed, index)."""
    out = np.empty((len(indices), 8), dtype=np.float32)
    for row, i in enumerate(indices):
        out[row] = np.random.default_rng([seed, int(i)]).random(8, dtype=np.float32)
    return out


def render(indices: Sequence[int], resolution: int = 32, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 3, R, R]`` and labels ``int64 [N]`` of the given dataset indices."""
    idx = torch.as_tensor(list(indices), dtype=torch.int64)
    labels = idx % NUM_CLASSES
    p = torch.from_numpy(_params(seed, idx.tolist()))
    n, r = len(idx), resolution
    coords = (torch.arange(r, dtype=torch.float32) + 0.5) / r  # pixel centres in [0, 1]
    yy, xx = coords.view(1, r, 1), coords.view(1, 1, r)
    size = (0.22 + 0.12 * p[:, 0]).view(n, 1, 1)
    cx = (0.5 + (p[:, 1] - 0.5) * (1.0 - 2.2 * p[:, 0] * 0.34 - 0.5)).view(n, 1, 1)
    cy = (0.5 + (p[:, 2] - 0.5) * (1.0 - 2.2 * p[:, 0] * 0.34 - 0.5)).view(n, 1, 1)
    dx, dy = xx - cx, yy - cy
    dist = torch.sqrt(dx * dx + dy * dy)
    # Signed "inside" distance per shape (positive inside), in image units.
    sdf = torch.stack([
        size - dist,                                                       # circle
        0.85 * size - torch.maximum(dx.abs(), dy.abs()),                   # square
        torch.minimum(0.8 * size - dy, (dy + 0.8 * size) * 0.55 - dx.abs()),  # triangle
        torch.maximum(torch.minimum(0.3 * size - dx.abs(), size - dy.abs()),
                      torch.minimum(0.3 * size - dy.abs(), size - dx.abs())),  # cross
        torch.minimum(size - dist, dist - 0.55 * size),                   # ring
    ], dim=1)
    shape_ids = torch.tensor(_SHAPES)[labels]
    sdf = sdf[torch.arange(n), shape_ids]
    mask = torch.sigmoid(sdf * r * 2.0).unsqueeze(1)                      # soft edge, ~1px
    shade = (0.8 + 0.2 * p[:, 3]).view(n, 1, 1, 1)
    fg = _COLOURS[labels].view(n, 3, 1, 1) * shade
    # Dark background with a gentle gradient and a per-image tint.
    angle = (p[:, 4] * 2 * math.pi).view(n, 1, 1)
    grad = (torch.cos(angle) * (xx - 0.5) + torch.sin(angle) * (yy - 0.5)).unsqueeze(1)
    base = (0.08 + 0.12 * p[:, 5:8]).view(n, 3, 1, 1)
    bg = (base + 0.10 * grad).clamp(0, 1)
    img = mask * fg + (1 - mask) * bg
    return (img * 255).round().clamp(0, 255).to(torch.uint8), labels


class IndexStream:
    """Infinite per-rank stream of batches over a map-style index space ``[0, size)``.

    Epoch ``e`` uses ``randperm(size)`` seeded by ``(seed, e)``; rank ``r`` of ``w`` takes the
    positions ``r, r + w, ...`` (a disjoint slice, global rank), cut into full batches. The position
    is the number of batches this rank has consumed, which makes resume exact.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int, start_batch: int = 0):
        per_rank = size // world_size
        if per_rank < batch_size:
            raise ValueError(f"dataset of {size} samples gives {per_rank} per rank for {world_size} ranks, "
                             f"fewer than one batch of {batch_size}")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed = seed
        self.batches_per_epoch = per_rank // batch_size
        self.position = start_batch

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.size, generator=g)
        return perm[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]

    def indices(self) -> Iterator[torch.Tensor]:
        epoch, cached = -1, None
        while True:
            e, b = divmod(self.position, self.batches_per_epoch)
            if e != epoch:
                epoch, cached = e, self._epoch_order(e)
            self.position += 1
            yield cached[b * self.batch_size:(b + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"batches": self.position}


class SyntheticStream:
    num_classes = NUM_CLASSES

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world_size: int, seed: int, start_batch: int):
        self.resolution = cfg.resolution
        self.data_seed = cfg.synthetic_seed
        self.flip = cfg.random_flip
        self.index = IndexStream(cfg.synthetic_size, batch_size, rank, world_size, seed, start_batch)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.index.indices():
            images, labels = render(idx.tolist(), self.resolution, self.data_seed)
            if self.flip:
                flip = (idx % 2 == 1).view(-1, 1, 1, 1)  # deterministic per index
                images = torch.where(flip, images.flip(-1), images)
            yield images, labels

    def state_dict(self) -> dict:
        return self.index.state_dict()


@register_backend("synthetic")
def build_synthetic(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                    start_batch: int = 0) -> SyntheticStream:
    return SyntheticStream(cfg, batch_size, rank, world_size, seed, start_batch)
