"""Plain convolutional GANs: the SN-GAN "standard CNN" and the DCGAN baseline.

``cnn32`` / ``cnn48``: the standard CNN of the SN-GAN paper (Miyato et al. 2018, Appendix B,
Table 3), with Mg = 4 (32 px) or 6 (48 px, STL-10):

- G: z -> dense -> Mg x Mg x 512, BN, ReLU; three 4x4 stride-2 deconvs 512 -> 256 -> 128 -> 64, each
  BN + ReLU; 3x3 conv -> 3; tanh. The BN after the dense layer is per channel of the reshaped map
  (chainer-gan-lib, whose generator the paper used, normalizes each of the Mg*Mg*512 features;
  per channel keeps a class-conditional BN small).
- D: conv3x3 64, conv4x4/2 64, conv3x3 128, conv4x4/2 128, conv3x3 256, conv4x4/2 256, conv3x3 512,
  each followed by leaky ReLU (slope 0.1, as the table), then dense -> 1 on the flattened
  Mg x Mg x 512 map.

``cnn32code`` / ``cnn48code`` (discriminators only): the layout of the code behind the published
numbers, which widens at the stride-2 convs instead: conv3x3 64, conv4x4/2 128, conv3x3 128,
conv4x4/2 256, conv3x3 256, conv4x4/2 512, conv3x3 512 (chainer-gan-lib ``common/net.py:204-210``
``SNDCGANDiscriminator``, which produced the SN-GAN paper's standard-CNN results, and
pytorch-gan-collections ``source/models/sngan.py:50-65``, behind the seeds' comparison). It has
twice the D parameters of the table's layout; slope 0.1 as the table and pytorch-gan-collections
(chainer-gan-lib's is Chainer's default 0.2; see docs/fidelity.md).

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

from .layers import ConditionalBatchNorm2d, DLayers, ProjectionHead, check_labels, normal_init
from .registry import register_discriminator, register_generator

__all__ = ["ConvGenerator", "ConvDiscriminator"]

_INIT = normal_init(0.02)


class ConvGenerator(nn.Module):
    """dense -> (BN, ReLU) -> 4x4/2 transposed convs with BN + ReLU -> output layer -> tanh.

    ``widths`` are the channels of the dense map and after each transposed conv. The output layer
    is a 3x3 conv (``out_conv3x3=True``, SN-GAN standard CNN) or one more 4x4/2 transposed conv to
    3 channels (DCGAN).
    """

    def __init__(self, widths: Sequence[int], bottom: int, out_conv3x3: bool, num_classes: int = 0,
                 z_dim: int = 128) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.num_classes = num_classes
        self.bottom = bottom
        ups = len(widths) - 1 + (0 if out_conv3x3 else 1)
        self.resolution = bottom * 2 ** ups
        self.linear = nn.Linear(z_dim, bottom * bottom * widths[0])
        self.bns = nn.ModuleList(ConditionalBatchNorm2d(w, num_classes) for w in widths)
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
        h = self.linear(z).view(z.shape[0], -1, self.bottom, self.bottom)
        h = F.relu(self.bns[0](h, y))
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


@register_generator("cnn32")
def cnn32_generator(num_classes: int = 0, ch: int = 64, z_dim: int = 128) -> ConvGenerator:
    return ConvGenerator([ch * 8, ch * 4, ch * 2, ch], 4, True, num_classes, z_dim)


@register_discriminator("cnn32")
def cnn32_discriminator(num_classes: int = 0, ch: int = 64, norm: str = "sn",
                        n_power_iterations: int = 1) -> ConvDiscriminator:
    return ConvDiscriminator(_standard_cnn_d(ch), 32, 0.1, num_classes, norm, n_power_iterations)


@register_discriminator("cnn32code")
def cnn32code_discriminator(num_classes: int = 0, ch: int = 64, norm: str = "sn",
                            n_power_iterations: int = 1) -> ConvDiscriminator:
    return ConvDiscriminator(_standard_cnn_d(ch, code_layout=True), 32, 0.1, num_classes, norm, n_power_iterations)


@register_generator("cnn48")
def cnn48_generator(num_classes: int = 0, ch: int = 64, z_dim: int = 128) -> ConvGenerator:
    return ConvGenerator([ch * 8, ch * 4, ch * 2, ch], 6, True, num_classes, z_dim)


@register_discriminator("cnn48")
def cnn48_discriminator(num_classes: int = 0, ch: int = 64, norm: str = "sn",
                        n_power_iterations: int = 1) -> ConvDiscriminator:
    return ConvDiscriminator(_standard_cnn_d(ch), 48, 0.1, num_classes, norm, n_power_iterations)


@register_discriminator("cnn48code")
def cnn48code_discriminator(num_classes: int = 0, ch: int = 64, norm: str = "sn",
                            n_power_iterations: int = 1) -> ConvDiscriminator:
    return ConvDiscriminator(_standard_cnn_d(ch, code_layout=True), 48, 0.1, num_classes, norm, n_power_iterations)


@register_generator("dcgan32")
def dcgan32_generator(num_classes: int = 0, ch: int = 64, z_dim: int = 128) -> ConvGenerator:
    return ConvGenerator([ch * 4, ch * 2, ch], 4, False, num_classes, z_dim)


@register_discriminator("dcgan32")
def dcgan32_discriminator(num_classes: int = 0, ch: int = 64, norm: str = "sn",
                          n_power_iterations: int = 1, batchnorm: bool = False) -> ConvDiscriminator:
    convs = [(ch, 4, 2), (ch * 2, 4, 2), (ch * 4, 4, 2)]
    return ConvDiscriminator(convs, 32, 0.2, num_classes, norm, n_power_iterations, batchnorm)
