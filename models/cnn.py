"""Plain convolutional GANs: the SN-GAN "standard CNN" and the DCGAN baseline.

``cnn32`` / ``cnn48``: the standard CNN of the SN-GAN paper (Miyato et al. 2018, Appendix B,
Table 3), with Mg = 4 (32 px) or 6 (48 px, STL-10):

- G: z -> dense -> Mg x Mg x 512, BN, ReLU; three 4x4 stride-2 deconvs 512 -> 256 -> 128 -> 64, each
  BN + ReLU; 3x3 conv -> 3; tanh. The BN after the dense layer is per channel of the reshaped map by
  default (``dense_bn="channel"``; it keeps a class-conditional BN small); ``dense_bn="feature"``
  normalizes each of the Mg*Mg*512 features on its own, as chainer-gan-lib's ``DCGANGenerator``
  (``common/net.py:75,91``: ``BatchNormalization(bottom_width * bottom_width * ch)`` on the dense
  output), whose generator produced the paper's standard-CNN numbers. Its last layer is a 3x3 stride-1
  *deconvolution* (``common/net.py:73``), which is this 3x3 conv with the kernel flipped and the
  channel axes swapped: the same function and, under Adam (elementwise), the same training.
  ``z_dist``: the latent distribution G is trained and sampled with, N(0, I) by default (the paper,
  pytorch-gan-collections) or U[-1, 1] (``"uniform"``: chainer-gan-lib's ``z_distribution`` default,
  ``common/net.py:56,79-82``); drawn by ``models.sample_z``.
- D: conv3x3 64, conv4x4/2 64, conv3x3 128, conv4x4/2 128, conv3x3 256, conv4x4/2 256, conv3x3 512,
  each followed by leaky ReLU (``slope``: 0.1 as the table by default; chainer-gan-lib's
  ``SNDCGANDiscriminator`` uses Chainer's default 0.2, ``common/net.py:214-220``), then dense -> 1 on
  the flattened Mg x Mg x 512 map.

``cnn32code`` / ``cnn48code`` (discriminators only): the layout of the code behind the published
numbers, which widens at the stride-2 convs instead: conv3x3 64, conv4x4/2 128, conv3x3 128,
conv4x4/2 256, conv3x3 256, conv4x4/2 512, conv3x3 512 (chainer-gan-lib ``common/net.py:204-210``
``SNDCGANDiscriminator``, which produced the SN-GAN paper's standard-CNN results, and
pytorch-gan-collections ``source/models/sngan.py:50-65``, behind the seeds' comparison). It has
twice the D parameters of the table's layout; slope 0.1 as the table and pytorch-gan-collections
by default (chainer-gan-lib's is Chainer's default 0.2: ``slope=0.2``; see docs/fidelity.md).

``dcgan32``: DCGAN (Radford et al. 2016, Sec. 3-4) at 32 px: G is dense -> 4x4 x 4ch, BN, ReLU, then
4x4 stride-2 transposed convs 4ch -> 2ch -> ch (BN + ReLU) -> 3 (tanh). D is 4x4 stride-2 convs
3 -> ch -> 2ch -> 4ch with leaky ReLU 0.2, then dense -> 1.
DCGAN's D uses BN (not after its first layer). Here D has **no BN by default, whatever the norm**:
the SN-GAN comparisons keep the architecture fixed and vary only the weight constraint, and a
batch-dependent BN makes a gradient penalty (which the trainer runs with ``norm="none"``) wrong
(Gulrajani et al. 2017, Sec. 4). ``batchnorm=True`` gives Radford et al.'s original D.

Class-conditional variants use conditional BN in G and the projection head in D; phi(x) is the
flattened last feature map (the input of the final dense layer). Init: N(0, 0.02) weights, zero bias
(Radford et al. Sec. 4; chainer-gan-lib ``wscale=0.02``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Z_DISTS, ConditionalBatchNorm2d, DLayers, ProjectionHead, check_labels, normal_init
from .registry import register_discriminator, register_generator

__all__ = ["ConvGenerator", "ConvDiscriminator"]

_INIT = normal_init(0.02)


class ConvGenerator(nn.Module):
    """dense -> (BN, ReLU) -> 4x4/2 transposed convs with BN + ReLU -> output layer -> tanh.

    ``widths`` are the channels of the dense map and after each transposed conv. The output layer
    is a 3x3 conv (``out_conv3x3=True``, SN-GAN standard CNN) or one more 4x4/2 transposed conv to
    3 channels (DCGAN).
    """

    DENSE_BN = ("channel", "feature")

    def __init__(self, widths: Sequence[int], bottom: int, out_conv3x3: bool, num_classes: int = 0,
                 z_dim: int = 128, dense_bn: str = "channel", z_dist: str = "normal") -> None:
        super().__init__()
        if dense_bn not in self.DENSE_BN:
            raise ValueError(f"dense_bn={dense_bn!r}; valid: {', '.join(self.DENSE_BN)}")
        if z_dist not in Z_DISTS:
            raise ValueError(f"z_dist={z_dist!r}; valid: {', '.join(Z_DISTS)}")
        self.z_dim = z_dim
        self.z_dist = z_dist     # the latent distribution G is trained with (``models.sample_z``)
        self.num_classes = num_classes
        self.bottom = bottom
        self.dense_bn = dense_bn
        ups = len(widths) - 1 + (0 if out_conv3x3 else 1)
        self.resolution = bottom * 2 ** ups
        self.linear = nn.Linear(z_dim, bottom * bottom * widths[0])
        # "feature": the first BN sees the dense output as a [B, Mg*Mg*C, 1, 1] map, i.e. one mean and
        # variance (and gain and bias) per feature.
        first = bottom * bottom * widths[0] if dense_bn == "feature" else widths[0]
        self.bns = nn.ModuleList(ConditionalBatchNorm2d(w, num_classes) for w in (first, *widths[1:]))
        self.deconvs = nn.ModuleList(nn.ConvTranspose2d(a, b, 4, 2, 1)
                                     for a, b in zip(widths, widths[1:]))
        if out_conv3x3:
            self.out = nn.Conv2d(widths[-1], 3, 3, 1, 1)
        else:
            self.out = nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1)
        for layer in (self.linear, *self.deconvs, self.out):
            _INIT(layer)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_labels(y, self.num_classes, type(self).__name__)
        if self.num_classes == 0:
            y = None
        h = self.linear(z)
        if self.dense_bn == "feature":
            h = F.relu(self.bns[0](h.view(z.shape[0], -1, 1, 1), y)).view(z.shape[0], -1, self.bottom, self.bottom)
        else:
            h = F.relu(self.bns[0](h.view(z.shape[0], -1, self.bottom, self.bottom), y))
        for deconv, bn in zip(self.deconvs, self.bns[1:]):
            h = F.relu(bn(deconv(h), y))
        return torch.tanh(self.out(h))


class ConvDiscriminator(nn.Module):
    """Convs ``(out_ch, kernel, stride)`` with leaky ReLU, flatten (phi), projection head."""

    def __init__(self, convs: Sequence[Tuple[int, int, int]], resolution: int, slope: float,
                 num_classes: int = 0, norm: str = "sn", n_power_iterations: int = 1,
                 batchnorm: bool = False) -> None:
        super().__init__()
        layers = DLayers(norm, n_power_iterations)
        self.num_classes = num_classes
        self.resolution = resolution
        self.norm = norm
        mods = []
        in_ch, size = 3, resolution
        for i, (out_ch, kernel, stride) in enumerate(convs):
            mods.append(layers.conv(in_ch, out_ch, kernel, stride, padding=1, init=_INIT))
            if batchnorm and i > 0:  # DCGAN: no BN on the first D layer (Radford et al. Sec. 3)
                mods.append(nn.BatchNorm2d(out_ch))
            mods.append(nn.LeakyReLU(slope))
            in_ch, size = out_ch, size // stride
        self.convs = nn.Sequential(*mods)
        self.feature_dim = in_ch * size * size
        self.head = ProjectionHead(layers, self.feature_dim, num_classes, init=_INIT)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) of shape [B, F]: the flattened last feature map (input of the dense layer)."""
        return self.convs(x).flatten(1)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.features(x), y)


def _standard_cnn_d(ch: int, code_layout: bool = False):
    # SN-GAN Table 3 with ch=64: 64, 64/2, 128, 128/2, 256, 256/2, 512; the code's layout widens at
    # the stride-2 convs: 64, 128/2, 128, 256/2, 256, 512/2, 512.
    if code_layout:
        mults = [(1, 3, 1), (2, 4, 2), (2, 3, 1), (4, 4, 2), (4, 3, 1), (8, 4, 2), (8, 3, 1)]
    else:
        mults = [(1, 3, 1), (1, 4, 2), (2, 3, 1), (2, 4, 2), (4, 3, 1), (4, 4, 2), (8, 3, 1)]
    return [(ch * m, k, s) for m, k, s in mults]


def _register_standard_cnn(resolution: int, bottom: int) -> None:
    """``cnn<R>`` G and D (the table's layout) and ``cnn<R>code`` D (the code's) at one resolution."""

    def generator(num_classes: int = 0, ch: int = 64, z_dim: int = 128, dense_bn: str = "channel",
                  z_dist: str = "normal") -> ConvGenerator:
        return ConvGenerator([ch * 8, ch * 4, ch * 2, ch], bottom, True, num_classes, z_dim, dense_bn, z_dist)

    def discriminator(code_layout: bool):
        def build(num_classes: int = 0, ch: int = 64, norm: str = "sn", n_power_iterations: int = 1,
                  slope: float = 0.1) -> ConvDiscriminator:
            return ConvDiscriminator(_standard_cnn_d(ch, code_layout), resolution, slope, num_classes, norm,
                                     n_power_iterations)
        return build

    register_generator(f"cnn{resolution}")(generator)
    register_discriminator(f"cnn{resolution}")(discriminator(False))
    register_discriminator(f"cnn{resolution}code")(discriminator(True))


_register_standard_cnn(32, 4)
_register_standard_cnn(48, 6)


@register_generator("dcgan32")
def dcgan32_generator(num_classes: int = 0, ch: int = 64, z_dim: int = 128, dense_bn: str = "channel",
                      z_dist: str = "normal") -> ConvGenerator:
    return ConvGenerator([ch * 4, ch * 2, ch], 4, False, num_classes, z_dim, dense_bn, z_dist)


@register_discriminator("dcgan32")
def dcgan32_discriminator(num_classes: int = 0, ch: int = 64, norm: str = "sn",
                          n_power_iterations: int = 1, batchnorm: bool = False, slope: float = 0.2) -> ConvDiscriminator:
    convs = [(ch, 4, 2), (ch * 2, 4, 2), (ch * 4, 4, 2)]
    return ConvDiscriminator(convs, 32, slope, num_classes, norm, n_power_iterations, batchnorm)
