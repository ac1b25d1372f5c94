"""Tests of models/spectral_norm.py: sigma, agreement with PyTorch's SN, fp32 under bf16, gradient,
eval mode and the double-forward (real + fake) backward that D relies on."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from models.spectral_norm import SpectralNorm, sigmas, spectral_norm, spectral_norm_layers


pytestmark = pytest.mark.usefixtures("one_thread")


def _sn(module: nn.Module) -> SpectralNorm:
    return module.parametrizations.weight[0]


def _raw(module: nn.Module) -> torch.Tensor:
    return module.parametrizations.weight.original


def _matrix(weight: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Weight as (out, -1), ``out_dim`` being the output dimension of the layer's weight."""
    return weight.movedim(out_dim, 0).reshape(weight.shape[out_dim], -1)


# (layer factory, dimension of the weight holding the outputs)
LAYERS = {
    "linear": (lambda: nn.Linear(12, 9), 0),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3), 0),
    # ConvTranspose2d weights are (in, out, kH, kW): sigma is that of the (out, in*kH*kW) matrix.
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(5, 3, 3), 1),
    "embedding": (lambda: nn.Embedding(10, 7), 0),
}


def _input_for(module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Embedding):
        return torch.tensor([0, 3, 9, 3])
    if isinstance(module, nn.Linear):
        return torch.randn(4, module.in_features)
    return torch.randn(2, module.in_channels, 6, 6)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_sigma_converges_to_largest_singular_value(kind):
    torch.manual_seed(0)
    factory, out_dim = LAYERS[kind]
    layer = spectral_norm(factory())
    for _ in range(300):  # each access of .weight in training mode is one power iteration
        layer.weight
    expected = torch.linalg.matrix_norm(_matrix(_raw(layer).detach().double(), out_dim), ord=2)
    assert float(_sn(layer).sigma) == pytest.approx(float(expected), rel=1e-3)
    # The normalized weight has unit spectral norm along the same reshape.
    with torch.no_grad():
        normalized = torch.linalg.matrix_norm(_matrix(layer.weight.double(), out_dim), ord=2)
    assert float(normalized) == pytest.approx(1.0, rel=1e-3)
    if out_dim == 1:  # the other reshape has a different spectral norm: the dim matters
        other = torch.linalg.matrix_norm(_matrix(_raw(layer).detach().double(), 0), ord=2)
        assert abs(float(other) - float(expected)) > 1e-2


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("n_power_iterations", [1, 3])
def test_matches_torch_spectral_norm_given_same_u(kind, n_power_iterations):
    torch.manual_seed(1)
    factory, _ = LAYERS[kind]
    base = factory()
    ours = spectral_norm(copy.deepcopy(base), n_power_iterations=n_power_iterations, iteration="uv")
    theirs = torch_spectral_norm(copy.deepcopy(base), n_power_iterations=n_power_iterations)
    with torch.no_grad():  # a far-from-converged state, so a different update order would show
        _sn(ours)._u.copy_(F.normalize(torch.randn_like(_sn(ours)._u), dim=0))
        _sn(ours)._v.copy_(F.normalize(torch.randn_like(_sn(ours)._v), dim=0))
        _sn(theirs)._u.copy_(_sn(ours)._u)
        _sn(theirs)._v.copy_(_sn(ours)._v)
    x = _input_for(base)
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        out_ours, out_theirs = ours(x), theirs(x)
        torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_sn(ours)._u, _sn(theirs)._u, rtol=1e-5, atol=1e-6)
        # Our hand-written backward equals autograd through torch's W / (u . W v).
        target = torch.randn_like(out_ours)
        (out_ours * target).sum().backward()
        (out_theirs * target).sum().backward()
        torch.testing.assert_close(_raw(ours).grad, _raw(theirs).grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_official_iteration_matches_the_old_torch_spectral_norm_in_float64(kind):
    """The default order is the official code's (v from u, then u, sigma = u^T W v), which is also
    ``torch.nn.utils.spectral_norm``'s (eps placement aside: x / max(||x||, eps) there): the same u
    gives the same outputs, u and gradients over several training forwards, to float64 rounding."""
    from torch.nn.utils import spectral_norm as old_torch_spectral_norm
    torch.manual_seed(3)
    factory, _ = LAYERS[kind]
    base = factory().double()
    ours = spectral_norm(copy.deepcopy(base), iteration="torch")
    official = spectral_norm(copy.deepcopy(base))
    theirs = old_torch_spectral_norm(copy.deepcopy(base))
    assert _raw(ours).dtype == torch.float64 and _sn(ours)._u.dtype == torch.float64
    with torch.no_grad():
        theirs.weight_u.copy_(_sn(ours)._u)
        _sn(official)._u.copy_(_sn(ours)._u)
    x = _input_for(base)
    x = x if kind == "embedding" else x.double()
    for _ in range(4):
        out_ours, out_theirs = ours(x), theirs(x)
        torch.testing.assert_close(out_ours, out_theirs, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(_sn(ours)._u, theirs.weight_u, rtol=1e-13, atol=1e-14)
        # The official eps placement, x / (||x|| + eps): eps = 1e-12 on norms of about 0.1-1 moves
        # each normalization by ~1e-11 relative, and nothing else differs.
        torch.testing.assert_close(official(x), out_theirs, rtol=1e-9, atol=1e-11)
        target = torch.randn_like(out_ours)
        (out_ours * target).sum().backward()
        (out_theirs * target).sum().backward()
        torch.testing.assert_close(_raw(ours).grad, theirs.weight_orig.grad, rtol=1e-12, atol=1e-13)
        with torch.no_grad():  # move W as training would, so a stale-u estimator would drift
            _raw(official).copy_(_raw(ours) - 0.05 * _raw(ours).grad)
            for w in (_raw(ours), theirs.weight_orig):
                w.sub_(0.05 * w.grad)
                w.grad = None


def test_official_iteration_is_algorithm_1_with_eps_in_the_denominator():
    """One forward against the paper's Algorithm 1 written out in numpy, eps added to the norm as
    the official ``max_sv.py`` does."""
    import numpy as np
    torch.manual_seed(4)
    layer = spectral_norm(nn.Linear(7, 5).double())
    w = _raw(layer).detach().numpy().copy()
    u = _sn(layer)._u.numpy().copy() * 3.0        # the official u is not normalized
    with torch.no_grad():
        _sn(layer)._u.copy_(torch.from_numpy(u))
    v = w.T @ u
    v = v / (np.sqrt((v * v).sum()) + 1e-12)
    u_new = w @ v
    u_new = u_new / (np.sqrt((u_new * u_new).sum()) + 1e-12)
    sigma = u_new @ w @ v
    w_sn = layer.weight.detach().numpy()
    np.testing.assert_allclose(w_sn, w / sigma, rtol=1e-13)
    np.testing.assert_allclose(_sn(layer)._u.numpy(), u_new, rtol=1e-13)
    # A different order (torch's parametrization) gives another W_SN from the same state.
    other = spectral_norm(nn.Linear(7, 5).double(), iteration="uv")
    with torch.no_grad():
        _raw(other).copy_(_raw(layer))
        _sn(other)._u.copy_(torch.from_numpy(u))
    assert float(np.max(np.abs(other.weight.detach().numpy() - w_sn))) > 1e-6


def test_bf16_autocast_keeps_power_iteration_fp32():
    torch.manual_seed(2)
    conv = spectral_norm(nn.Conv2d(8, 16, 3, padding=1))
    reference = copy.deepcopy(conv)
    x = torch.randn(2, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    ref_out = reference(x)  # fp32, same starting u
    sn, ref_sn = _sn(conv), _sn(reference)
    assert out.dtype == torch.bfloat16
    assert sn._u.dtype == sn._v.dtype == sn.sigma.dtype == torch.float32
    assert float(sn.sigma) == pytest.approx(float(ref_sn.sigma), rel=1e-5)
    torch.testing.assert_close(sn._u, ref_sn._u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)


def test_bf16_weights_still_iterate_in_fp32():
    torch.manual_seed(3)
    conv = spectral_norm(nn.Conv2d(8, 16, 3, padding=1))
    u_before, v_before = _sn(conv)._u.clone(), _sn(conv)._v.clone()
    conv.to(torch.bfloat16)
    sn = _sn(conv)
    assert _raw(conv).dtype == torch.bfloat16
    assert sn._u.dtype == sn._v.dtype == sn.sigma.dtype == torch.float32
    assert torch.equal(sn._u, u_before) and torch.equal(sn._v, v_before)  # no bf16 round trip

    out = conv(torch.randn(2, 8, 8, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # Reference: one fp64 power iteration from the same (u, v) on the bf16 weight.
    w = _raw(conv).detach().double().reshape(16, -1)
    v = F.normalize(w.t() @ u_before.double(), dim=0)   # the official order: v from u, then u
    u = F.normalize(w @ v, dim=0)
    sigma = u @ w @ v
    assert float(sn.sigma) == pytest.approx(float(sigma), rel=1e-5)


def test_gradient_goes_through_sigma():
    """The paper's gradient (Sec. 2.1, Eq. 10-12), not a stop-gradient on sigma: once u, v have
    converged, d/dW of W / sigma(W) equals autograd through the exact spectral norm."""
    torch.manual_seed(4)
    weight = torch.randn(3, 4, dtype=torch.float32)
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    spectral_norm(layer)
    for _ in range(200):
        layer.weight
    layer.eval()
    target = torch.randn(3, 4)

    loss = (layer.weight * target).sum()
    loss.backward()
    ours = _raw(layer).grad.double()

    w = weight.double().requires_grad_(True)
    ((w / torch.linalg.matrix_norm(w, ord=2)) * target.double()).sum().backward()
    torch.testing.assert_close(ours, w.grad, rtol=1e-4, atol=1e-5)

    w_stop = weight.double().requires_grad_(True)
    ((w_stop / torch.linalg.matrix_norm(w_stop, ord=2).detach()) * target.double()).sum().backward()
    assert (ours - w_stop.grad).abs().max() > 1e-2  # a stop-gradient would differ


def test_eval_mode_leaves_u_unchanged_and_is_deterministic():
    torch.manual_seed(5)
    conv = spectral_norm(nn.Conv2d(3, 5, 3)).eval()
    u, v = _sn(conv)._u.clone(), _sn(conv)._v.clone()
    x = torch.randn(2, 3, 7, 7)
    first, second = conv(x), conv(x)
    assert torch.equal(first, second)
    assert torch.equal(_sn(conv)._u, u) and torch.equal(_sn(conv)._v, v)
    conv.train()
    conv(x)
    assert not torch.equal(_sn(conv)._u, u)  # training mode does iterate


@pytest.mark.parametrize("n_power_iterations", [1, 2])
def test_two_forwards_then_one_backward(n_power_iterations):
    """D is called on reals and fakes before one backward; DDP may also overwrite the buffers in
    place (broadcast_buffers) in between. Neither may trip autograd's in-place check."""
    torch.manual_seed(6)
    conv = spectral_norm(nn.Conv2d(3, 4, 3), n_power_iterations=n_power_iterations)
    real, fake = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6, requires_grad=True)
    loss = conv(real).relu().mean() + conv(fake).relu().mean()
    with torch.no_grad():  # what a DDP buffer broadcast does before the next forward
        _sn(conv)._u.copy_(F.normalize(torch.randn(4), dim=0))
    loss.backward()
    assert _raw(conv).grad is not None and torch.isfinite(_raw(conv).grad).all()
    assert fake.grad is not None


def test_layer_listing_and_sigmas():
    model = nn.Sequential(spectral_norm(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2),
                          spectral_norm(nn.Conv2d(1, 2, 1)))
    assert [name for name, _ in spectral_norm_layers(model)] == ["0", "3"]
    values = sigmas(model)
    assert set(values) == {"0", "3"} and all(v > 0 for v in values.values())
    with pytest.raises(ValueError, match="already parametrized"):
        spectral_norm(model[0])


def test_torch_compile_gives_eager_gradients():
    """Compiled, the power iteration must not be recomputed in backward from the (by then updated)
    buffers: gradients equal eager ones, also after two forwards before one backward."""
    torch.manual_seed(7)
    eager = spectral_norm(nn.Linear(3, 4))
    with torch.no_grad():  # far from converged, so a recomputed iteration would change the result
        _sn(eager)._u.copy_(F.normalize(torch.randn(4), dim=0))
        _sn(eager)._v.copy_(F.normalize(torch.randn(3), dim=0))
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module)
    x1, x2 = torch.randn(2, 3), torch.randn(2, 3)
    for _ in range(2):
        for module, fn in ((eager, eager), (compiled_module, compiled)):
            module.zero_grad()
            (fn(x1).pow(2).sum() + fn(x2).pow(2).sum()).backward()
        torch.testing.assert_close(_raw(compiled_module).grad, _raw(eager).grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_sn(compiled_module)._u, _sn(eager)._u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,dim", [((4, 3), 0), ((3, 2, 2, 2), 0), ((2, 3, 2, 2), 1), ((5,), 0)])
def test_backward_passes_gradcheck(shape, dim):
    """W / (u^T W v) with u, v held constant: our closed-form backward against finite differences,
    first and second order (the latter for gradient penalties on an SN discriminator)."""
    from models.spectral_norm import _DivideBySigma, _matrix, _sigma
    torch.manual_seed(8)
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rows, cols = _matrix(weight.detach(), dim).shape
    u = F.normalize(torch.randn(rows, dtype=torch.float64), dim=0)
    v = F.normalize(torch.randn(cols, dtype=torch.float64), dim=0)

    def fn(w):  # sigma's value recomputed from w, as the forward does; u, v constant
        return _DivideBySigma.apply(w, u, v, _sigma(_matrix(w.detach(), dim), u, v), dim)  # W_SN, sigma

    assert torch.autograd.gradcheck(fn, (weight,))
    assert torch.autograd.gradgradcheck(fn, (weight,))


def test_gradient_penalty_through_sn_matches_torch():
    torch.manual_seed(9)
    base = nn.Conv2d(3, 4, 3)
    ours, theirs = spectral_norm(copy.deepcopy(base), iteration="uv"), torch_spectral_norm(copy.deepcopy(base))
    with torch.no_grad():
        _sn(theirs)._u.copy_(_sn(ours)._u)
        _sn(theirs)._v.copy_(_sn(ours)._v)
    x = torch.randn(2, 3, 6, 6)
    for module in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        (grad_x,) = torch.autograd.grad(module(xi).tanh().sum(), xi, create_graph=True)
        grad_x.pow(2).sum().backward()
    torch.testing.assert_close(_raw(ours).grad, _raw(theirs).grad, rtol=1e-4, atol=1e-6)
