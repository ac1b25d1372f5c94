"""Sample grids at fixed z: one row per class for conditional models (up to ``rows`` classes)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def fixed_inputs(z_dim: int, num_classes: int, rows: int = 10, cols: int = 10, seed: int = 0,
                 z_dist: str = "normal"):
    from models import sample_z
    g = torch.Generator().manual_seed(seed + 12345)
    z = sample_z(rows * cols, z_dim, z_dist, generator=g)
    y = None
    if num_classes > 0:
        rows_shown = min(rows, num_classes)
        classes = torch.linspace(0, num_classes - 1, rows_shown).round().long()
        y = classes.repeat_interleave(cols)
        z = z[: rows_shown * cols]
    return z, y


@torch.no_grad()
def render_grid(G: nn.Module, z: torch.Tensor, y, cols: int = 10, batch: int = 50) -> torch.Tensor:
    """Images of G (switched to eval mode for the call) as one [3, H, W] grid in [0, 1]."""
    was_training = G.training
    G.eval()
    try:
        device = next(G.parameters()).device
        outs = []
        for i in range(0, z.shape[0], batch):
            yb = None if y is None else y[i:i + batch].to(device)
            outs.append(G(z[i:i + batch].to(device), yb).float().cpu())
        x = torch.cat(outs)
    finally:
        G.train(was_training)
    x = (x.clamp(-1, 1) + 1) / 2
    return torchvision.utils.make_grid(x, nrow=cols, padding=1, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: str) -> None:
    torchvision.utils.save_image(grid, path)
