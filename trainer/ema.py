"""Exponential moving average of G with a half-life counted in images.

beta = 0.5 ** (images_per_step / half_life_images), so the averaging horizon stays the same when the
batch size or the number of ranks changes (ARCHITECTURE.md, practice 6). Buffers (BN running statistics, SN
vectors) are copied, not averaged.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, half_life_images: float):
        if half_life_images <= 0:
            raise ValueError(f"EMA half-life must be > 0 images, got {half_life_images}")
        self.half_life_images = half_life_images

    def beta(self, images_per_step: int) -> float:
        return 0.5 ** (images_per_step / self.half_life_images)

    @torch.no_grad()
    def update(self, ema: nn.Module, model: nn.Module, images_per_step: int) -> None:
        beta = self.beta(images_per_step)
        ema_params = list(ema.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
        for b_ema, b in zip(ema.buffers(), model.buffers()):
            b_ema.copy_(b)


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    for d, s in zip(dst.state_dict().values(), src.state_dict().values()):
        d.copy_(s)
