"""Layers shared by the generators and discriminators of the model zoo.

- ``DLayers``: the discriminator's weight layers (conv, linear, embedding) with the normalization
  chosen once by name and passed into every block (ARCHITECTURE.md, practice 9). ``"sn"`` is our fp32
  spectral norm (Miyato et al. 2018, Sec. 2.1), ``"wn"`` is PyTorch's weight normalization
  (Salimans & Kingma 2016, one of the paper's baselines) and ``"none"`` leaves the layer alone; the
  trainer maps constraints applied outside the layers (orthonormal regularization, weight clipping,
  gradient penalty) to ``"none"``.
- ``ConditionalBatchNorm2d``: the generator's class-conditional BN (de Vries et al. 2017; used in
  every G block of the projection paper, Miyato & Koyama 2018, Sec. 4): BN without affine
  parameters followed by a per-class gain and bias.
- ``ProjectionHead``: the discriminator output psi(phi(x)) + <embed(y), phi(x)> (Miyato & Koyama
  2018, Sec. 3, Fig. 1 "projection"), used by every D of the zoo.
- Initializers and the label check shared by all models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .spectral_norm import spectral_norm

__all__ = ["NORMS", "Z_DISTS", "sample_z", "apply_norm", "DLayers", "GBatchNorm2d", "set_bn_splits", "set_bn_eps",
           "ConditionalBatchNorm2d", "ProjectionHead",
           "xavier_init", "normal_init", "check_labels"]

NORMS = ("sn", "wn", "none")

Init = Callable[[nn.Module], None]


def xavier_init(gain: float = 1.0) -> Init:
    """Xavier/Glorot uniform weights and zero bias, as ``GlorotUniform`` in the official chainer code
    (gain sqrt(2) for the residual convs, 1 for shortcuts, linear and embedding layers)."""
    def init(module: nn.Module) -> None:
        nn.init.xavier_uniform_(module.weight, gain=gain)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    return init


def normal_init(std: float = 0.02) -> Init:
    """N(0, std^2) weights and zero bias: the DCGAN recipe (Radford et al. 2016, Sec. 4), also used by
    the standard-CNN models of the SN-GAN experiments."""
    def init(module: nn.Module) -> None:
        nn.init.normal_(module.weight, 0.0, std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    return init


def apply_norm(module: nn.Module, norm: str, n_power_iterations: int = 1) -> nn.Module:
    """Wrap ``module.weight`` with the layer normalization named ``norm`` (one of ``NORMS``).

    Call it after the weight has been initialised: SN warms its power iteration up on the initial
    weight and WN takes its gain g from the initial norm.
    """
    if norm == "sn":
        return spectral_norm(module, n_power_iterations=n_power_iterations)
    if norm == "wn":
        return weight_norm(module, name="weight", dim=0)
    if norm == "none":
        return module
    raise ValueError(f"unknown layer normalization {norm!r}; valid: {list(NORMS)}")


@dataclass(frozen=True)
class DLayers:
    """Constructors of the discriminator's weight layers, normalized by ``norm``.

    Built once per discriminator and handed to every block, so a block never names the
    normalization itself.
    """

    norm: str = "sn"
    n_power_iterations: int = 1

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown layer normalization {self.norm!r}; valid: {list(NORMS)}")
        if self.n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {self.n_power_iterations}")

    def _wrap(self, module: nn.Module, init: Init) -> nn.Module:
        init(module)
        return apply_norm(module, self.norm, self.n_power_iterations)

    def conv(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0,
             bias: bool = True, init: Init = xavier_init(1.0)) -> nn.Module:
        return self._wrap(nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=bias), init)

    def linear(self, in_features: int, out_features: int, bias: bool = True,
               init: Init = xavier_init(1.0)) -> nn.Module:
        return self._wrap(nn.Linear(in_features, out_features, bias=bias), init)

    def embedding(self, num_embeddings: int, dim: int, init: Init = xavier_init(1.0)) -> nn.Module:
        """The class embedding V of the projection head (SN-normalized as ``SNEmbedID`` in the
        official code: sigma of the (num_classes, dim) matrix)."""
        return self._wrap(nn.Embedding(num_embeddings, dim), init)


def check_labels(y: Optional[torch.Tensor], num_classes: int, who: str) -> None:
    """A conditional model needs labels; fail loudly instead of silently dropping the condition."""
    if num_classes > 0 and y is None:
        raise ValueError(f"{who} is class-conditional (num_classes={num_classes}): pass labels y, "
                         f"an int64 tensor of shape [B] with values in [0, {num_classes})")


Z_DISTS = ("normal", "uniform")


def sample_z(n: int, z_dim: int, dist: str = "normal", generator: Optional[torch.Generator] = None,
             device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``[n, z_dim]`` latents: N(0, I) (``"normal"``) or U[-1, 1) (``"uniform"``, chainer-gan-lib's
    default for its standard-CNN generator). A generator's own choice is its ``z_dist`` attribute."""
    if dist == "normal":
        return torch.randn(n, z_dim, generator=generator, device=device, dtype=dtype)
    if dist == "uniform":
        return torch.rand(n, z_dim, generator=generator, device=device, dtype=dtype).mul_(2).sub_(1)
    raise ValueError(f"unknown latent distribution {dist!r}; valid: {', '.join(Z_DISTS)}")


BN_EPS = 2e-5   # Chainer's BatchNormalization default, used by the official code (see docs/fidelity.md)


class GBatchNorm2d(nn.BatchNorm2d):
    """The generator's BatchNorm: eps 2e-5 as the official Chainer code, and optional per-slice
    statistics ("ghost" batch norm).

    With ``splits = k > 1`` a training batch of B samples is normalised as k slices of B / k
    samples, each with its own mean and variance, and the running statistics move towards the
    slices' average. The official ImageNet models were trained on 4 GPUs with batch statistics
    per GPU; on one GPU, ``splits=4`` gives G's BN the same statistics per slice (the trainer sets
    it from ``model.bn_world``, see ``models.set_bn_splits``). Eval mode is unaffected.
    """

    def __init__(self, num_features: int, eps: float = BN_EPS, momentum: float = 0.1, affine: bool = True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.splits = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.splits, x.shape[0]
        if not self.training or k <= 1 or n % k or n // k < 2:
            return super().forward(x)
        c = x.shape[1]
        xs = (x if x.dtype == torch.float64 else x.float()).reshape(k, n // k, c, *x.shape[2:])
        dims = (1, *range(3, xs.dim()))
        var, mean = torch.var_mean(xs, dim=dims, unbiased=False, keepdim=True)
        out = ((xs - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.track_running_stats:
            count = xs[0].numel() // c
            with torch.no_grad():
                self.running_mean.lerp_(mean.mean(0).flatten(), self.momentum)
                self.running_var.lerp_((var * (count / max(count - 1, 1))).mean(0).flatten(), self.momentum)
                self.num_batches_tracked.add_(1)
        if self.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def _set_on_g_batchnorms(model: nn.Module, name: str, value) -> int:
    count = 0
    for m in model.modules():
        if isinstance(m, GBatchNorm2d):
            setattr(m, name, value)
            count += 1
    return count


def set_bn_splits(model: nn.Module, splits: int) -> int:
    """Set ``splits`` on every :class:`GBatchNorm2d` of ``model``; returns how many were set."""
    return _set_on_g_batchnorms(model, "splits", splits)


def set_bn_eps(model: nn.Module, eps: float) -> int:
    """Set ``eps`` on every :class:`GBatchNorm2d` of ``model`` (the trainer's ``model.bn_eps``)."""
    return _set_on_g_batchnorms(model, "eps", eps)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm2d(affine=False) followed by per-class gain gamma[y] and bias beta[y].

    gamma starts at 1 and beta at 0 (as ``CategoricalConditionalBatchNormalization`` of the official
    code), so at initialisation it is a plain BN. With ``num_classes=0`` it is an ordinary affine
    BatchNorm2d and ``y`` is ignored.
    """

    def __init__(self, num_features: int, num_classes: int = 0, eps: float = BN_EPS,
                 momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_classes = num_classes
        self.bn = GBatchNorm2d(num_features, eps=eps, momentum=momentum, affine=num_classes == 0)
        if num_classes > 0:
            self.gamma = nn.Embedding(num_classes, num_features)
            self.beta = nn.Embedding(num_classes, num_features)
            nn.init.ones_(self.gamma.weight)
            nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.bn(x)
        if self.num_classes == 0:
            return h
        check_labels(y, self.num_classes, type(self).__name__)
        # Cast to the activation dtype so bf16 autocast keeps bf16 activations.
        gamma = self.gamma(y).to(h.dtype)[:, :, None, None]
        beta = self.beta(y).to(h.dtype)[:, :, None, None]
        return torch.addcmul(beta, h, gamma)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_classes={self.num_classes}"


def _autocast_off(device_type: str):
    """Autocast disabled where there is one to disable (``meta`` has none: structure-only builds
    and FLOP counting run the head on meta tensors)."""
    import contextlib
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class ProjectionHead(nn.Module):
    """D output from the features phi(x): psi(phi) + <V[y], phi> (Miyato & Koyama 2018, Sec. 3).

    psi is a linear layer to one unit, V the class embedding; with ``num_classes=0`` there is no
    embedding and the head is psi alone (an unconditional D). Returns logits of shape [B].
    """

    def __init__(self, layers: DLayers, features: int, num_classes: int = 0, bias: bool = True,
                 init: Init = xavier_init(1.0)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.linear = layers.linear(features, 1, bias=bias, init=init)
        self.embed = layers.embedding(num_classes, features, init=init) if num_classes > 0 else None

    def forward(self, h: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.embed is not None:
            check_labels(y, self.num_classes, "the projection discriminator")
        # The head costs nothing next to the convs: run it in the parameters' own dtype with
        # autocast off, so the logits are fp32 under bf16 autocast, conditional or not.
        dtype = next(self.linear.parameters()).dtype
        with _autocast_off(h.device.type):
            h = h.to(dtype)
            out = self.linear(h).squeeze(1)
            if self.embed is not None:
                out = out + (self.embed(y) * h).sum(dim=1)
        return out
