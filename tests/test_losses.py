"""Losses and D constraints give exact values on tiny inputs."""

import math

import pytest
import torch
from torch import nn

from trainer.losses import get_loss
from trainer.regularizers import build_constraint, clip_weights, gradient_penalty, orthonormal_penalty

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def sp(x):
    return math.log1p(math.exp(x))


def test_hinge():
    L = get_loss("hinge")
    # relu(1 - [2, .5, -1]) = [0, .5, 2]; relu(1 + [-2, 0, 1.5]) = [0, 1, 2.5]
    assert L.d_loss(REAL, FAKE).item() == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)
    assert L.g_loss(FAKE).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_wasserstein():
    L = get_loss("wasserstein")
    assert L.d_loss(REAL, FAKE).item() == pytest.approx((-0.5 / 3) - (1.5 / 3))
    assert L.g_loss(FAKE).item() == pytest.approx(0.5 / 3)


def test_non_saturating_and_minimax():
    ns, mm = get_loss("ns"), get_loss("minimax")
    d = sum(sp(-r) for r in REAL.tolist()) / 3 + sum(sp(f) for f in FAKE.tolist()) / 3
    assert ns.d_loss(REAL, FAKE).item() == pytest.approx(d, rel=1e-6)
    assert mm.d_loss(REAL, FAKE).item() == pytest.approx(d, rel=1e-6)
    # G: -log sigmoid(f) vs log(1 - sigmoid(f)) = -softplus(f)
    assert ns.g_loss(FAKE).item() == pytest.approx(sum(sp(-f) for f in FAKE.tolist()) / 3, rel=1e-6)
    assert mm.g_loss(FAKE).item() == pytest.approx(-sum(sp(f) for f in FAKE.tolist()) / 3, rel=1e-6)


def test_unknown_loss():
    with pytest.raises(ValueError, match="hinge"):
        get_loss("lsgan")


class LinearCritic(nn.Module):
    """D(x) = <w, x> + b: its input gradient is w everywhere, so GP = lambda (||w|| - 1)^2."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x, y=None):
        return (x.flatten(1) * self.w).sum(1) + 0.3


def test_gradient_penalty_closed_form():
    w = torch.tensor([3.0, 4.0, 0.0, 0.0]).view(1, 4)
    D = LinearCritic(w.view(-1))
    real, fake = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    gp = gradient_penalty(D, real, fake, None, weight=10.0)
    assert gp.item() == pytest.approx(10.0 * (5.0 - 1.0) ** 2)
    gp.backward()  # double backward reaches the critic's weights: d/dw 10 (||w|| - 1)^2 = 20 (||w|| - 1) w / ||w||
    assert torch.allclose(D.w.grad, 20 * 4.0 * w.view(-1) / 5.0)


def test_orthonormal_penalty():
    D = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        D[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert orthonormal_penalty(D, 1.0).item() == pytest.approx(0.0)
    with torch.no_grad():
        D[0].weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
    # W W^T = [[4, 0], [0, 2]] -> ||W W^T - I||_F^2 = 9 + 1
    assert orthonormal_penalty(D, 0.5).item() == pytest.approx(5.0)


def test_clip_and_constraint_table():
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.fill_(0.5)
    clip_weights(lin, 0.01)
    assert lin.weight.abs().max().item() == pytest.approx(0.01)
    assert build_constraint("sn").layer_norm == "sn" and build_constraint("sn").penalty is None
    assert build_constraint("wn").layer_norm == "wn"
    assert build_constraint("gp").layer_norm == "none" and build_constraint("gp").penalty is not None
    assert build_constraint("clip").after_step is not None
    with pytest.raises(ValueError, match="sn, wn"):
        build_constraint("spectral")
