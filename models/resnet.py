"""ResNet generators and discriminators of SN-GAN and the projection cGAN.

Layouts follow the SN-GAN paper's ResNet tables (Miyato et al. 2018, Appendix B: CIFAR-10 and
STL-10) and the official chainer code of the projection paper (pfnet-research/sngan_projection:
``gen_models/resnet*.py``, ``dis_models/snresnet*.py``):

============  =========================================  ===========================================
name          G (channels as multiples of ``ch``)        D (optimized block, then blocks)
============  =========================================  ===========================================
resnet32      ch=256: 4x4 x1 -> up x1, x1, x1            ch=128: opt x1, down x1, x1, x1
resnet48      ch=64:  6x6 x8 -> up x4, x2, x1            ch=64:  opt x1, down x2, x4, x8, then x16
resnet128     ch=64:  4x4 x16 -> up x16, x8, x4, x2, x1  ch=64:  opt x1, down x2, x4, x8, x16, then x16
resnet256     ch=32:  4x4 x16 -> up x16, x8, x8, x4,     ch=32:  opt x1, down x2, x4, x8, x8, x16,
                      x2, x1                                     then x16
============  =========================================  ===========================================

G: linear z -> bottom x bottom map, up-blocks (BN-ReLU-up-conv3x3-BN-ReLU-conv3x3 plus a 1x1
shortcut when the shape changes), then BN-ReLU-conv3x3-tanh. Every block BN is class-conditional
when ``num_classes > 0``; the final BN is plain, as in the official code.
D: residual blocks (ReLU-conv3x3-ReLU-conv3x3, average-pool 2x2 when downsampling), the first one
"optimized" (no leading ReLU, pooled shortcut), then ReLU, global *sum* pooling = phi(x), and the
projection head psi(phi) + <V[y], phi> (Miyato & Koyama 2018, Sec. 3).

Init: Xavier uniform, gain sqrt(2) for the residual convs and 1 for shortcuts, linear and embedding
layers (``GlorotUniform`` in the official code); biases zero.

The 1x1 shortcut conv commutes with nearest upsampling and with 2x2 average pooling, so G applies
it before upsampling and D after pooling: the same function as the official code at a quarter of
the shortcut's cost.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConditionalBatchNorm2d, DLayers, GBatchNorm2d, ProjectionHead, check_labels, xavier_init
from .registry import register_discriminator, register_generator

__all__ = ["ResNetGenerator", "ResNetDiscriminator", "GBlock", "DBlock", "OptimizedDBlock"]

_RESIDUAL_INIT = xavier_init(math.sqrt(2.0))
_SHORTCUT_INIT = xavier_init(1.0)


def _conv(in_ch: int, out_ch: int, kernel_size: int, init) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
    init(conv)
    return conv


class GBlock(nn.Module):
    """Generator residual block with 2x nearest upsampling (official ``gen_models/resblocks.py``)."""

    def __init__(self, in_ch: int, out_ch: int, num_classes: int = 0, upsample: bool = True) -> None:
        super().__init__()
        self.upsample = upsample
        self.b1 = ConditionalBatchNorm2d(in_ch, num_classes)
        self.c1 = _conv(in_ch, out_ch, 3, _RESIDUAL_INIT)
        self.b2 = ConditionalBatchNorm2d(out_ch, num_classes)
        self.c2 = _conv(out_ch, out_ch, 3, _RESIDUAL_INIT)
        learnable_sc = in_ch != out_ch or upsample
        self.c_sc = _conv(in_ch, out_ch, 1, _SHORTCUT_INIT) if learnable_sc else None

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest") if self.upsample else x

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.c1(self._up(F.relu(self.b1(x, y))))
        h = self.c2(F.relu(self.b2(h, y)))
        shortcut = x if self.c_sc is None else self.c_sc(x)
        return h + self._up(shortcut)


class DBlock(nn.Module):
    """Discriminator residual block, optional 2x2 average-pool downsampling (hidden width = input
    width, as the official ``dis_models/resblocks.py``)."""

    def __init__(self, layers: DLayers, in_ch: int, out_ch: int, downsample: bool = True) -> None:
        super().__init__()
        self.downsample = downsample
        self.c1 = layers.conv(in_ch, in_ch, 3, padding=1, init=_RESIDUAL_INIT)
        self.c2 = layers.conv(in_ch, out_ch, 3, padding=1, init=_RESIDUAL_INIT)
        learnable_sc = in_ch != out_ch or downsample
        self.c_sc = layers.conv(in_ch, out_ch, 1, init=_SHORTCUT_INIT) if learnable_sc else None

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._down(self.c2(F.relu(self.c1(F.relu(x)))))
        shortcut = self._down(x)
        if self.c_sc is not None:
            shortcut = self.c_sc(shortcut)
        return h + shortcut


class OptimizedDBlock(nn.Module):
    """First D block: no ReLU on the input image, shortcut = conv1x1(avgpool(x))."""

    def __init__(self, layers: DLayers, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.c1 = layers.conv(in_ch, out_ch, 3, padding=1, init=_RESIDUAL_INIT)
        self.c2 = layers.conv(out_ch, out_ch, 3, padding=1, init=_RESIDUAL_INIT)
        self.c_sc = layers.conv(in_ch, out_ch, 1, init=_SHORTCUT_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))


class ResNetGenerator(nn.Module):
    """G(z, y): linear -> ``widths[0]`` x bottom x bottom, one up-block per further width."""

    def __init__(self, widths: Sequence[int], bottom: int, num_classes: int = 0,
                 z_dim: int = 128) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.num_classes = num_classes
        self.bottom = bottom
        self.resolution = bottom * 2 ** (len(widths) - 1)
        self.linear = nn.Linear(z_dim, bottom * bottom * widths[0])
        _SHORTCUT_INIT(self.linear)
        self.blocks = nn.ModuleList(GBlock(a, b, num_classes) for a, b in zip(widths, widths[1:]))
        self.bn = GBatchNorm2d(widths[-1])
        self.conv = _conv(widths[-1], 3, 3, _SHORTCUT_INIT)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_labels(y, self.num_classes, type(self).__name__)
        if self.num_classes == 0:
            y = None
        h = self.linear(z).view(z.shape[0], -1, self.bottom, self.bottom)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.conv(F.relu(self.bn(h))))


class ResNetDiscriminator(nn.Module):
    """D(x, y): optimized block to ``first``, then ``(width, downsample)`` blocks, ReLU, global sum
    pooling (phi), projection head."""

    def __init__(self, first: int, blocks: Sequence[Tuple[int, bool]], resolution: int,
                 num_classes: int = 0, norm: str = "sn", n_power_iterations: int = 1,
                 head_bias: bool = True) -> None:
        super().__init__()
        layers = DLayers(norm, n_power_iterations)
        self.num_classes = num_classes
        self.resolution = resolution
        self.norm = norm
        mods = [OptimizedDBlock(layers, 3, first)]
        width = first
        for out, down in blocks:
            mods.append(DBlock(layers, width, out, downsample=down))
            width = out
        self.blocks = nn.Sequential(*mods)
        self.feature_dim = width
        self.head = ProjectionHead(layers, width, num_classes, bias=head_bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) of shape [B, F]: after the final ReLU and global sum pooling; ignores labels."""
        return F.relu(self.blocks(x)).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.features(x), y)


def _d_blocks(ch: int, spec: Sequence[Tuple[int, bool]]):
    return [(ch * mult, down) for mult, down in spec]


# --- CIFAR-10, 32 px (SN-GAN Appendix B, ResNet for CIFAR-10; official *_32.py, ch=256 / 128) ---

@register_generator("resnet32")
def resnet32_generator(num_classes: int = 0, ch: int = 256, z_dim: int = 128) -> ResNetGenerator:
    return ResNetGenerator([ch] * 4, bottom=4, num_classes=num_classes, z_dim=z_dim)


@register_discriminator("resnet32")
def resnet32_discriminator(num_classes: int = 0, ch: int = 128, norm: str = "sn",
                           n_power_iterations: int = 1) -> ResNetDiscriminator:
    # The official 32 px D has no bias on its final linear layer (``SNLinear(..., nobias=True)``).
    return ResNetDiscriminator(ch, _d_blocks(ch, [(1, True), (1, False), (1, False)]), 32,
                               num_classes, norm, n_power_iterations, head_bias=False)


# --- STL-10, 48 px (SN-GAN Appendix B, ResNet for STL-10: 6x6x512 base, D up to 1024) ---

@register_generator("resnet48")
def resnet48_generator(num_classes: int = 0, ch: int = 64, z_dim: int = 128) -> ResNetGenerator:
    return ResNetGenerator([ch * 8, ch * 4, ch * 2, ch], bottom=6, num_classes=num_classes,
                           z_dim=z_dim)


@register_discriminator("resnet48")
def resnet48_discriminator(num_classes: int = 0, ch: int = 64, norm: str = "sn",
                           n_power_iterations: int = 1) -> ResNetDiscriminator:
    spec = [(2, True), (4, True), (8, True), (16, False)]
    return ResNetDiscriminator(ch, _d_blocks(ch, spec), 48, num_classes, norm, n_power_iterations)


# --- ImageNet, 128 px (projection paper; official gen_models/resnet.py, dis_models/snresnet_128.py) ---

@register_generator("resnet128")
def resnet128_generator(num_classes: int = 0, ch: int = 64, z_dim: int = 128) -> ResNetGenerator:
    return ResNetGenerator([ch * m for m in (16, 16, 8, 4, 2, 1)], bottom=4,
                           num_classes=num_classes, z_dim=z_dim)


@register_discriminator("resnet128")
def resnet128_discriminator(num_classes: int = 0, ch: int = 64, norm: str = "sn",
                            n_power_iterations: int = 1) -> ResNetDiscriminator:
    spec = [(2, True), (4, True), (8, True), (16, True), (16, False)]
    return ResNetDiscriminator(ch, _d_blocks(ch, spec), 128, num_classes, norm, n_power_iterations)


# --- 256 px (official resnet_dog_and_cat_256.py / snresnet_256.py, run there with ch=32) ---

@register_generator("resnet256")
def resnet256_generator(num_classes: int = 0, ch: int = 32, z_dim: int = 128) -> ResNetGenerator:
    return ResNetGenerator([ch * m for m in (16, 16, 8, 8, 4, 2, 1)], bottom=4,
                           num_classes=num_classes, z_dim=z_dim)


@register_discriminator("resnet256")
def resnet256_discriminator(num_classes: int = 0, ch: int = 32, norm: str = "sn",
                            n_power_iterations: int = 1) -> ResNetDiscriminator:
    spec = [(2, True), (4, True), (8, True), (8, True), (16, True), (16, False)]
    return ResNetDiscriminator(ch, _d_blocks(ch, spec), 256, num_classes, norm, n_power_iterations)
