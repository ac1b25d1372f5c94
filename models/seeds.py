"""Architectures of pytorch-gan-collections (PGC, w86763777 @ 860e90b) that the rest of the zoo
cannot express: the models behind the seeds' comparison table (``launch/experiments/seeds_*.yaml``).

``pgc_dcgan32`` (PGC ``source/models/dcgan.py``, used by its ``dcgan.py`` with ``--arch=cnn32``):

- G: z viewed as a 1x1 map, a 2x2 transposed conv (stride 1, no padding) to 8ch at 2x2, BN, ReLU;
  4x4 stride-2 transposed convs 8ch -> 4ch -> 2ch -> ch, each BN + ReLU; one more 4x4 stride-2
  transposed conv to 3 channels (32 px), tanh. No bias anywhere; ch = 128 (1024 channels at 2x2).
- D: 5x5 stride-2 convs (padding 2, no bias) 3 -> ch -> 2ch -> 4ch -> 8ch, each followed by leaky
  ReLU 0.2 and, from the second conv on, a BatchNorm *after* the activation (PGC's order); then a
  dense layer (with bias) on the flattened 2x2 x 8ch map; ch = 64.
- Init: PyTorch's defaults (PGC re-initialises nothing in this file). G's BN is the zoo's
  ``GBatchNorm2d`` (its eps is the trainer's ``model.bn_eps``; PGC's is torch's 1e-5); D's BN is a plain
  ``nn.BatchNorm2d`` with torch's eps 1e-5.

``pgc_resnet32`` (discriminator only; PGC ``source/models/wgangp.py`` ``ResDiscriminator32``, its
WGAN-GP ResNet): the zoo's ``resnet32`` D (the same blocks, ch 128) with a bias on the final dense
layer (``:230``), initialised as PGC leaves it: Xavier-uniform weight (``:233-234``) and torch's default
bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

The other PGC models are the zoo's own: ``cnn32`` G with the ``cnn32code`` D (PGC
``wgangp.py``/``sngan.py`` ``Generator32``/``Discriminator32``), ``resnet32`` G and D (PGC
``sngan.py`` ``ResGenerator32``/``ResDiscriminator32`` and ``wgangp.py`` ``ResGenerator32``).
The weight layers of every D here come from ``DLayers``, so spectral norm, clipping and the gradient
penalty apply to them as to every other model.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .layers import ConditionalBatchNorm2d, DLayers, ProjectionHead, check_labels
from .registry import register_discriminator, register_generator
from .resnet import ResNetDiscriminator

__all__ = ["PGCDCGANGenerator", "PGCDCGANDiscriminator"]


def _keep_default(module: nn.Module) -> None:
    """PGC's DCGAN keeps PyTorch's default initialisation (``reset_parameters`` at construction)."""


class PGCDCGANGenerator(nn.Module):
    """z -> 2x2 (transposed conv, kernel 2) -> four 4x4/2 transposed convs to 32 px; no biases."""

    def __init__(self, ch: int = 128, num_classes: int = 0, z_dim: int = 100) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.z_dist = "normal"          # dcgan.py:135,152 torch.randn
        self.num_classes = num_classes
        self.resolution = 32
        widths = [ch * 8, ch * 4, ch * 2, ch]
        self.first = nn.ConvTranspose2d(z_dim, widths[0], 2, 1, 0, bias=False)
        self.bns = nn.ModuleList(ConditionalBatchNorm2d(w, num_classes) for w in widths)
        self.deconvs = nn.ModuleList(nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False)
                                     for a, b in zip(widths, widths[1:]))
        self.out = nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1, bias=False)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_labels(y, self.num_classes, type(self).__name__)
        if self.num_classes == 0:
            y = None
        h = torch.relu(self.bns[0](self.first(z.view(z.shape[0], self.z_dim, 1, 1)), y))
        for deconv, bn in zip(self.deconvs, self.bns[1:]):
            h = torch.relu(bn(deconv(h), y))
        return torch.tanh(self.out(h))


class PGCDCGANDiscriminator(nn.Module):
    """5x5/2 convs (no bias) with leaky ReLU 0.2 and BN after the activation from the second conv on,
    flatten (phi), dense head with bias."""

    def __init__(self, ch: int = 64, num_classes: int = 0, norm: str = "none", n_power_iterations: int = 1,
                 resolution: int = 32, slope: float = 0.2) -> None:
        super().__init__()
        layers = DLayers(norm, n_power_iterations)
        self.num_classes = num_classes
        self.resolution = resolution
        self.norm = norm
        mods, in_ch = [], 3
        for i, out_ch in enumerate((ch, ch * 2, ch * 4, ch * 8)):
            mods.append(layers.conv(in_ch, out_ch, 5, 2, padding=2, bias=False, init=_keep_default))
            mods.append(nn.LeakyReLU(slope))
            if i > 0:
                mods.append(nn.BatchNorm2d(out_ch))
            in_ch = out_ch
        self.convs = nn.Sequential(*mods)
        side = resolution // 16
        self.feature_dim = in_ch * side * side
        self.head = ProjectionHead(layers, self.feature_dim, num_classes, bias=True, init=_keep_default)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x).flatten(1)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.features(x), y)


@register_generator("pgc_dcgan32")
def pgc_dcgan32_generator(num_classes: int = 0, ch: int = 128, z_dim: int = 100) -> PGCDCGANGenerator:
    return PGCDCGANGenerator(ch, num_classes, z_dim)


@register_discriminator("pgc_dcgan32")
def pgc_dcgan32_discriminator(num_classes: int = 0, ch: int = 64, norm: str = "none",
                              n_power_iterations: int = 1, slope: float = 0.2) -> PGCDCGANDiscriminator:
    return PGCDCGANDiscriminator(ch, num_classes, norm, n_power_iterations, slope=slope)


@register_discriminator("pgc_resnet32")
def pgc_resnet32_discriminator(num_classes: int = 0, ch: int = 128, norm: str = "sn",
                               n_power_iterations: int = 1) -> ResNetDiscriminator:
    D = ResNetDiscriminator(ch, [(ch, True), (ch, False), (ch, False)], 32, num_classes, norm,
                            n_power_iterations, head_bias=True)
    bias = D.head.linear.bias
    bound = 1.0 / math.sqrt(D.feature_dim)   # nn.Linear's default bias init, which PGC keeps
    if bias.device.type != "meta":
        with torch.no_grad():
            bias.uniform_(-bound, bound)
    return D
