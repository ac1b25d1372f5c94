"""GAN losses on discriminator outputs (SN-GAN paper, Sec. 4 and Eq. 16-17).

Each loss is a pair of functions of D's raw outputs (logits / critic values):
- ``d_loss(d_real, d_fake)``: minimised by D,
- ``g_loss(d_fake)``: minimised by G.

hinge        D: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]        G: -E[D(G(z))]   (Eq. 16-17)
wasserstein  D: E[D(G(z))] - E[D(x)]                               G: -E[D(G(z))]
ns           D: E[softplus(-D(x))] + E[softplus(D(G(z)))]         G: E[softplus(-D(G(z)))]
             (the non-saturating "DCGAN" / "KL" loss of Goodfellow et al., Sec. 3)
minimax      D as ns;                                              G: -E[softplus(D(G(z)))]
             (the original log(1 - D(G(z))) G objective)
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple

import torch
import torch.nn.functional as F


class GANLoss(NamedTuple):
    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g_loss: Callable[[torch.Tensor], torch.Tensor]


def _hinge_d(d_real, d_fake):
    return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()


def _wasserstein_d(d_real, d_fake):
    return d_fake.mean() - d_real.mean()


def _ns_d(d_real, d_fake):
    # -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def _mean_neg(d_fake):
    return -d_fake.mean()


def _ns_g(d_fake):
    return F.softplus(-d_fake).mean()        # -log sigmoid(D(G(z)))


def _minimax_g(d_fake):
    return -F.softplus(d_fake).mean()        # log(1 - sigmoid(D(G(z))))


LOSSES: Dict[str, GANLoss] = {
    "hinge": GANLoss(_hinge_d, _mean_neg),
    "wasserstein": GANLoss(_wasserstein_d, _mean_neg),
    "ns": GANLoss(_ns_d, _ns_g),
    "minimax": GANLoss(_ns_d, _minimax_g),
}


def get_loss(name: str) -> GANLoss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {sorted(LOSSES)}")
    return LOSSES[name]
