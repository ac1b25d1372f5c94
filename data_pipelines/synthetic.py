"""The embedded dataset: "shapes10", procedurally generated class-conditional images.

Ten classes, each a (shape, colour) pair that a person recognises at a glance: a red circle, an
orange square, a yellow triangle, a green cross, a cyan ring, a blue square, a violet circle, a
magenta triangle, a white cross and a lime ring. Image ``i`` is a pure function of ``(seed, i)`` and
its class is ``i % 10``, so the dataset needs no download and no files, and any index can be
regenerated exactly (neighbour search, reference statistics).

Each image is one large shape (its outer radius 30-36% of the image width, so 19-23 px across at 32
px) near the centre (jitter +-3% of the width), in its colour at 85-100% brightness on a nearly
black background with a per-image tint and a gentle gradient, anti-aliased by pixel coverage (a
linear ramp one pixel wide across the edge). The variation is kept small on purpose: the embedded
default trains for a few CPU minutes, and its sample grid must show each class's shape, not only
its colour.

The per-image parameters come from a counter-based hash of ``(seed, index, k)`` (SplitMix64),
computed for a whole batch at once, and the pixels are drawn with numpy in float32: no per-image
generator objects, and no multi-threaded tensor ops whose thread hand-offs dominate on a busy CPU
(``benchmarks/default_run.py`` measures it).

The training stream walks a per-epoch permutation of the indices, sliced by *global* rank, so ranks
see disjoint data; ``start_batch`` resumes exactly where a run stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .config import DataConfig
from .errors import DataInputError
from .stream import register_backend

NUM_CLASSES = 10
CLASS_NAMES = ("red circle", "orange square", "yellow triangle", "green cross", "cyan ring",
               "blue square", "violet circle", "magenta triangle", "white cross", "lime ring")
SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ring")
SHAPES = np.array([0, 1, 2, 3, 4, 1, 0, 2, 3, 4])      # shape id of each class
COLOURS = np.array([
    [0.95, 0.15, 0.15], [1.00, 0.55, 0.05], [0.95, 0.90, 0.10], [0.10, 0.75, 0.20],
    [0.10, 0.85, 0.90], [0.15, 0.30, 0.95], [0.60, 0.25, 0.90], [0.95, 0.20, 0.75],
    [0.95, 0.95, 0.95], [0.60, 0.95, 0.20]], dtype=np.float32)
NUM_PARAMS = 8

_M64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a bijective 64-bit mix."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _params(seed: int, indices: Sequence[int], count: int = NUM_PARAMS) -> np.ndarray:
    """``float32 [N, count]`` uniform in [0, 1): entry (row, k) a pure function of (seed, index, k)."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(np.full((1, 1), int(seed) & _M64, dtype=np.uint64)) ^ idx)
        bits = _splitmix64(key + np.arange(1, count + 1, dtype=np.uint64).reshape(1, -1) * np.uint64(0xD1B54A32D192ED03))
    return ((bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24))


def draw(shapes: np.ndarray, fg: np.ndarray, bg: np.ndarray, size: np.ndarray, cx: np.ndarray, cy: np.ndarray,
         resolution: int) -> np.ndarray:
    """``float32 [N, 3, R, R]`` in [0, 1]: shape ``shapes[n]`` (ids of SHAPE_NAMES) of outer radius
    ``size[n]`` centred at ``(cx[n], cy[n])`` (image units, [0, 1]), colour ``fg [N, 3]`` over the
    background ``bg [N, 3, R, R]`` (or broadcastable), anti-aliased by pixel coverage."""
    n, r = len(shapes), resolution
    c = (np.arange(r, dtype=np.float32) + 0.5) / r            # pixel centres in [0, 1]
    dx = c.reshape(1, 1, r) - cx.reshape(n, 1, 1).astype(np.float32)
    dy = c.reshape(1, r, 1) - cy.reshape(n, 1, 1).astype(np.float32)
    s = size.reshape(n, 1, 1).astype(np.float32)
    sdf = np.empty((n, r, r), dtype=np.float32)               # signed distance, positive inside
    for shape in range(len(SHAPE_NAMES)):
        m = shapes == shape
        if not m.any():
            continue
        x, y, z = dx[m], dy[m], s[m]
        ax, ay = np.abs(x), np.abs(y)
        if shape == 0:
            out = z - np.sqrt(x * x + y * y)
        elif shape == 1:
            out = 0.82 * z - np.maximum(ax, ay)
        elif shape == 2:    # apex up; the slanted edges' distance normalised by sqrt(1 + 0.6^2)
            out = np.minimum(0.85 * z - y, ((y + 0.95 * z) * 0.6 - ax) / 1.1662)
        elif shape == 3:
            out = np.maximum(np.minimum(0.3 * z - ax, z - ay), np.minimum(0.3 * z - ay, z - ax))
        else:
            d = np.sqrt(x * x + y * y)
            out = np.minimum(z - d, d - 0.55 * z)
        sdf[m] = out
    mask = np.clip(sdf * r + 0.5, 0.0, 1.0)[:, None]         # coverage of a 1-px wide ramp
    return mask * fg.reshape(n, 3, 1, 1).astype(np.float32) + (1.0 - mask) * bg


def render(indices: Sequence[int], resolution: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 3, R, R]`` and labels ``int64 [N]`` of the given dataset indices."""
    idx = np.asarray(indices.tolist() if isinstance(indices, torch.Tensor) else list(indices), dtype=np.int64)
    labels = idx % NUM_CLASSES
    p = _params(seed, idx)
    n, r = len(idx), resolution
    size = 0.30 + 0.06 * p[:, 0]
    cx, cy = 0.5 + 0.06 * (p[:, 1] - 0.5), 0.5 + 0.06 * (p[:, 2] - 0.5)
    fg = COLOURS[labels] * (0.85 + 0.15 * p[:, 3:4])
    # Nearly black background: a per-image tint and a gentle linear gradient.
    c = (np.arange(r, dtype=np.float32) + 0.5) / r - 0.5
    angle = (2 * math.pi) * p[:, 4].reshape(n, 1, 1, 1)
    grad = np.cos(angle) * c.reshape(1, 1, 1, r) + np.sin(angle) * c.reshape(1, 1, r, 1)
    bg = np.clip(0.03 + 0.09 * p[:, 5:8].reshape(n, 3, 1, 1) + 0.06 * grad, 0.0, 1.0).astype(np.float32)
    img = draw(SHAPES[labels], fg, bg, size, cx, cy, r)
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(out), torch.from_numpy(labels)


class IndexStream:
    """Infinite per-rank stream of batches over a map-style index space ``[0, size)``.

    Epoch ``e`` uses ``randperm(size)`` seeded by ``(seed, e)``; rank ``r`` of ``w`` takes the
    positions ``r, r + w, ...`` (a disjoint slice, global rank), cut into full batches. The position
    is the number of batches this rank has consumed, which makes resume exact.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int, start_batch: int = 0):
        per_rank = size // world_size
        if per_rank < batch_size:
            raise DataInputError(f"dataset of {size} samples gives {per_rank} per rank for {world_size} ranks, "
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
