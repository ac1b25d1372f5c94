"""Discriminator constraints compared in the SN-GAN paper (Sec. 4, Table 1/2).

A constraint has three parts, applied uniformly to every D layer:
- ``layer_norm``: the normalization the D builder wraps each layer with (``sn``, ``wn`` or ``none``);
- ``penalty(D, real, fake, y)``: an extra D loss term (WGAN-GP, orthonormal), or None;
- ``after_step(D)``: a projection after each D optimizer step (WGAN weight clipping).

=====  ============  ======================================================================
name   layer_norm    extra
=====  ============  ======================================================================
sn     sn            -- (spectral normalization, Miyato et al. 2018)
wn     wn            -- (weight normalization, Salimans & Kingma 2016)
orth   none          beta * sum_W ||W W^T - I||_F^2 (Brock et al. 2016; Eq. 19 of SN-GAN)
clip   none          clamp every D parameter to [-c, c] after each step (Arjovsky et al. 2017)
gp     none          lambda * E[(||grad_x D(x_hat)||_2 - 1)^2] (Gulrajani et al. 2017)
none   none          --
=====  ============  ======================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


def gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, y: Optional[torch.Tensor],
                     weight: float, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """WGAN-GP on random interpolates x_hat = a * real + (1 - a) * fake, a ~ U[0, 1] per sample
    (``alpha``: the batch's a, drawn by the caller from its checkpointed generator; else here)."""
    if alpha is None:
        alpha = torch.rand(real.shape[0], device=real.device)
    alpha = alpha.to(real.dtype).view(-1, 1, 1, 1)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = D(x_hat, y)
    wide = (lambda t: t) if out.dtype == torch.float64 else (lambda t: t.float())
    (grad,) = torch.autograd.grad(wide(out).sum(), x_hat, create_graph=True)
    norms = wide(grad).flatten(1).norm(dim=1)
    return weight * (norms - 1.0).pow(2).mean()


def _weight_matrices(D: nn.Module):
    for name, p in D.named_parameters():
        if p.ndim >= 2 and not name.endswith("original0") and not name.endswith("original1"):
            yield p.reshape(p.shape[0], -1)


def orthonormal_penalty(D: nn.Module, weight: float) -> torch.Tensor:
    """beta * sum ||W W^T - I||_F^2 over D's weight matrices (reshaped to (out, -1)).

    The Gram matrix is taken over the smaller side of W, so that the penalty can reach zero (a wide
    conv kernel cannot have W^T W = I).
    """
    total = None
    for w in _weight_matrices(D):
        w = w if w.dtype == torch.float64 else w.float()
        gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
        eye = torch.eye(gram.shape[0], device=w.device, dtype=w.dtype)
        term = (gram - eye).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("orthonormal regularization found no weight matrices in D")
    return weight * total


@torch.no_grad()
def clip_weights(D: nn.Module, c: float) -> None:
    for p in D.parameters():
        p.clamp_(-c, c)


@dataclass
class DConstraint:
    name: str
    layer_norm: str
    penalty: Optional[Callable[..., torch.Tensor]] = None   # (D, real, fake, y, alpha) -> tensor
    after_step: Optional[Callable[[nn.Module], None]] = None


def build_constraint(name: str, gp_weight: float = 10.0, orth_weight: float = 1e-4,
                     clip_value: float = 0.01) -> DConstraint:
    if name in ("sn", "wn", "none"):
        return DConstraint(name, name)
    if name == "gp":
        return DConstraint(name, "none", penalty=lambda D, real, fake, y, alpha=None:
                           gradient_penalty(D, real, fake, y, gp_weight, alpha))
    if name == "orth":
        return DConstraint(name, "none", penalty=lambda D, real, fake, y, alpha=None: orthonormal_penalty(D, orth_weight))
    if name == "clip":
        return DConstraint(name, "none", after_step=lambda D: clip_weights(D, clip_value))
    raise ValueError(f"unknown D constraint {name!r}; valid: sn, wn, orth, clip, gp, none")
