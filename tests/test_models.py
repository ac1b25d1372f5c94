"""Tests of the model zoo: shapes and the common interface, the projection head, parameter counts
from hand-written formulas, bf16 autocast, channels_last, the D normalizations and the registry."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from models import (ConditionalBatchNorm2d, DLayers, GBatchNorm2d, ProjectionHead, build_discriminator,
                    build_generator, discriminator_names, generator_names, set_bn_splits, spectral_norm_layers)
from models.export import load_generator, save_generator
from models.spectral_norm import SpectralNorm


pytestmark = pytest.mark.usefixtures("one_thread")


ARCHS = ["cnn32", "cnn48", "dcgan32", "resnet32", "resnet48", "resnet128", "resnet256"]
RESOLUTION = {"cnn32": 32, "cnn48": 48, "dcgan32": 32, "resnet32": 32, "resnet48": 48,
              "resnet128": 128, "resnet256": 256}
SMALL = {"resnet128": {"ch": 8}, "resnet256": {"ch": 8}}  # shape test: only the big ones narrow
TINY = {"ch": 8}  # every other test: all models narrow, so the file stays fast on 2 cores
NUM_CLASSES = 5


def _pair(name, num_classes=0, widths=TINY):
    g = build_generator(name, num_classes=num_classes, **widths)
    d = build_discriminator(name, num_classes=num_classes, **widths)
    return g, d


def _inputs(g, batch=2):
    z = torch.randn(batch, g.z_dim)
    y = torch.randint(0, g.num_classes, (batch,)) if g.num_classes else None
    return z, y


def _expected_feature_dim(name, ch):
    if name.startswith("cnn"):  # flattened (R/8) x (R/8) x 8ch map
        return (RESOLUTION[name] // 8) ** 2 * 8 * ch
    if name == "dcgan32":
        return 4 * 4 * 4 * ch
    return ch if name == "resnet32" else 16 * ch


D_DEFAULT_CH = {"cnn32": 64, "cnn48": 64, "dcgan32": 64, "resnet32": 128, "resnet48": 64,
                "resnet128": 64, "resnet256": 32}


CODE_LAYOUT_D = ["cnn32code", "cnn48code"]   # discriminators only: the official code's standard CNN


SEEDS_G, SEEDS_D = ["pgc_dcgan32"], ["pgc_dcgan32", "pgc_resnet32"]   # models/seeds.py (tests/test_seeds_suite.py)


def test_registry_names():
    assert generator_names() == sorted(ARCHS + SEEDS_G)
    assert discriminator_names() == sorted(ARCHS + CODE_LAYOUT_D + SEEDS_D)


@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
@pytest.mark.parametrize("name", ARCHS)
def test_shapes_and_interface(name, conditional):
    torch.manual_seed(0)
    num_classes = NUM_CLASSES if conditional else 0
    g, d = _pair(name, num_classes, widths=SMALL.get(name, {}))
    res = RESOLUTION[name]
    assert (g.z_dim, g.num_classes, g.resolution) == (128, num_classes, res)
    assert (d.num_classes, d.resolution) == (num_classes, res)
    z, y = _inputs(g)
    x = g(z, y)
    assert x.shape == (2, 3, res, res)
    assert x.abs().max() <= 1.0
    logits = d(x, y)
    assert logits.shape == (2,) and logits.dtype == torch.float32
    ch = SMALL.get(name, {}).get("ch", D_DEFAULT_CH[name])  # D's width
    assert d.features(x).shape == (2, _expected_feature_dim(name, ch))


@pytest.mark.parametrize("name", ["resnet32", "cnn32"])
def test_conditional_models_require_labels(name):
    g, d = _pair(name, NUM_CLASSES)
    z, _ = _inputs(g)
    with pytest.raises(ValueError, match="labels"):
        g(z)
    with pytest.raises(ValueError, match="labels"):
        d(torch.randn(2, 3, 32, 32))


def test_projection_head_hand_computed():
    head = ProjectionHead(DLayers("none"), features=3, num_classes=2)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        head.linear.bias.fill_(0.5)
        head.embed.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [2.0, 2.0, 2.0]]))
    h = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])
    y = torch.tensor([0, 1])
    # psi(h) = w.h + b = [6.5, 8.5]; <V[y], h> = [1 + 0 - 1, 0 + 2 + 4] = [0, 6]
    torch.testing.assert_close(head(h, y), torch.tensor([6.5, 14.5]))
    unconditional = ProjectionHead(DLayers("none"), features=3, num_classes=0)
    assert unconditional.embed is None


@pytest.mark.parametrize("name", ["resnet32", "cnn32"])
def test_discriminator_is_psi_plus_projection(name):
    torch.manual_seed(1)
    _, d = _pair(name, NUM_CLASSES)
    d.eval()  # fixed u, so every weight access gives the same W_SN
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
    with torch.no_grad():
        phi = d.features(x)
        expected = d.head.linear(phi).squeeze(1) + (d.head.embed.weight[y] * phi).sum(1)
        torch.testing.assert_close(d(x, y), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- parameter counts by formula


def conv(i, o, k, bias=True):
    return i * o * k * k + (o if bias else 0)


def linear(i, o, bias=True):
    return i * o + (o if bias else 0)


def bn(c, classes=0):
    return 2 * c * classes if classes else 2 * c  # gamma, beta (per class when conditional)


def resnet_g(z, bottom, widths, classes):
    total = linear(z, bottom * bottom * widths[0])
    for i, o in zip(widths, widths[1:]):  # BN, conv3x3, BN, conv3x3, 1x1 shortcut
        total += bn(i, classes) + conv(i, o, 3) + bn(o, classes) + conv(o, o, 3) + conv(i, o, 1)
    return total + bn(widths[-1]) + conv(widths[-1], 3, 3)


def resnet_d(first, blocks, classes, head_bias=True):
    total = conv(3, first, 3) + conv(first, first, 3) + conv(3, first, 1)  # optimized block
    width = first
    for out, down in blocks:
        total += conv(width, width, 3) + conv(width, out, 3)
        if width != out or down:
            total += conv(width, out, 1)
        width = out
    return total + linear(width, 1, head_bias) + classes * width


def cnn_g(z, bottom, widths, classes, out_conv3x3):
    total = linear(z, bottom * bottom * widths[0]) + bn(widths[0], classes)
    for i, o in zip(widths, widths[1:]):
        total += conv(i, o, 4) + bn(o, classes)  # transposed conv: same count as a conv
    return total + (conv(widths[-1], 3, 3) if out_conv3x3 else conv(widths[-1], 3, 4))


def cnn_d(convs, feature_dim, classes):
    total, i = 0, 3
    for o, k in convs:
        total, i = total + conv(i, o, k), o
    return total + linear(feature_dim, 1) + classes * feature_dim


STANDARD_D = [(64, 3), (64, 4), (128, 3), (128, 4), (256, 3), (256, 4), (512, 3)]
# chainer-gan-lib common/net.py:204-210 (SNDCGANDiscriminator, ch=512): c0_0 3->64 k3, c0_1 64->128 k4,
# c1_0 128->128 k3, c1_1 128->256 k4, c2_0 256->256 k3, c2_1 256->512 k4, c3_0 512->512 k3; l4 4*4*512 -> 1.
CODE_D = [(64, 3), (128, 4), (128, 3), (256, 4), (256, 3), (512, 4), (512, 3)]
EXPECTED_COUNTS = {  # (G, D) at default widths; 1000 classes for 128/256 px, else unconditional
    "cnn32": (cnn_g(128, 4, [512, 256, 128, 64], 0, True), cnn_d(STANDARD_D, 4 * 4 * 512, 0)),
    "cnn48": (cnn_g(128, 6, [512, 256, 128, 64], 0, True), cnn_d(STANDARD_D, 6 * 6 * 512, 0)),
    "dcgan32": (cnn_g(128, 4, [256, 128, 64], 0, False),
                cnn_d([(64, 4), (128, 4), (256, 4)], 4 * 4 * 256, 0)),
    "resnet32": (resnet_g(128, 4, [256] * 4, 0),
                 resnet_d(128, [(128, True), (128, False), (128, False)], 0, head_bias=False)),
    "resnet48": (resnet_g(128, 6, [512, 256, 128, 64], 0),
                 resnet_d(64, [(128, True), (256, True), (512, True), (1024, False)], 0)),
    "resnet128": (resnet_g(128, 4, [1024, 1024, 512, 256, 128, 64], 1000),
                  resnet_d(64, [(128, True), (256, True), (512, True), (1024, True),
                                (1024, False)], 1000)),
    "resnet256": (resnet_g(128, 4, [512, 512, 256, 256, 128, 64, 32], 1000),
                  resnet_d(32, [(64, True), (128, True), (256, True), (256, True), (512, True),
                                (512, False)], 1000)),
}


@pytest.mark.parametrize("name, res", [("cnn32code", 32), ("cnn48code", 48)])
def test_code_layout_discriminator_counts_and_shapes(name, res):
    """The official code's layout: twice the table's D parameters (the seeds' and the paper's code)."""
    with torch.device("meta"):
        d = build_discriminator(name)
        table = build_discriminator(name.replace("code", ""))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(d) == cnn_d(CODE_D, (res // 8) ** 2 * 512, 0)
    assert res != 32 or count(d) == 5_860_865   # 2,935,873 in the table's layout
    assert count(d) > 1.9 * count(table)
    torch.manual_seed(0)
    d = build_discriminator(name, num_classes=NUM_CLASSES, **TINY)
    x = torch.randn(2, 3, res, res)
    assert d(x, torch.tensor([0, 3])).shape == (2,)
    assert d.features(x).shape == (2, (res // 8) ** 2 * 8 * 8)


@pytest.mark.parametrize("name", ARCHS)
def test_parameter_counts_at_default_width(name):
    classes = 1000 if RESOLUTION[name] >= 128 else 0
    with torch.device("meta"):  # structure only: no memory, no init cost
        g = build_generator(name, num_classes=classes)
        d = build_discriminator(name, num_classes=classes)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(g), count(d)) == EXPECTED_COUNTS[name]


# ---------------------------------------------------------------- precision, layout, norms


def _sn_buffers(model):
    for _, sn in spectral_norm_layers(model):
        yield from (sn._u, sn._v, sn.sigma)


@pytest.mark.parametrize("name", ARCHS)
def test_bf16_autocast_forward_backward(name):
    torch.manual_seed(2)
    g, d = _pair(name, NUM_CLASSES)
    z, y = _inputs(g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = g(z, y)
        logits = d(x, y)
    assert x.dtype == torch.bfloat16 and logits.dtype == torch.float32
    (logits.mean() + x.float().mean()).backward()
    buffers = list(_sn_buffers(d))
    assert buffers and all(b.dtype == torch.float32 for b in buffers)
    for p in list(g.parameters()) + list(d.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", ["resnet32", "cnn32", "dcgan32"])
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(3)
    g, d = _pair(name, NUM_CLASSES)
    g.eval(), d.eval()
    z, y = _inputs(g, batch=3)
    with torch.no_grad():
        x = g(z, y)
        logits = d(x, y)
        g.to(memory_format=torch.channels_last)
        d.to(memory_format=torch.channels_last)
        x_cl = g(z, y)
        logits_cl = d(x_cl.contiguous(memory_format=torch.channels_last), y)
    torch.testing.assert_close(x_cl, x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_cl, logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("norm", ["sn", "wn", "none"])
@pytest.mark.parametrize("name", ARCHS)
def test_discriminator_norms(name, norm):
    torch.manual_seed(4)
    d = build_discriminator(name, num_classes=NUM_CLASSES, norm=norm, n_power_iterations=2, **TINY)
    weighted = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    parametrized = [m for m in weighted if parametrize.is_parametrized(m, "weight")]
    if norm == "sn":
        assert len(parametrized) == len(weighted)
        assert all(sn.n_power_iterations == 2 for _, sn in spectral_norm_layers(d))
    elif norm == "wn":
        assert len(parametrized) == len(weighted)
        assert not any(isinstance(m, SpectralNorm) for m in d.modules())
    else:
        assert not parametrized
    res = RESOLUTION[name]
    logits = d(torch.randn(2, 3, res, res), torch.tensor([1, 3]))
    logits.sum().backward()
    assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_dcgan_discriminator_batchnorm_option():
    plain = build_discriminator("dcgan32", norm="none", **TINY)
    radford = build_discriminator("dcgan32", norm="none", batchnorm=True, **TINY)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in radford.modules()) == 2  # not after layer 1
    assert radford(torch.randn(2, 3, 32, 32)).shape == (2,)


def test_unknown_names_are_reported_with_the_valid_ones():
    with pytest.raises(ValueError, match="resnet64.*valid.*resnet128"):
        build_generator("resnet64")
    with pytest.raises(ValueError, match="valid.*cnn32"):
        build_discriminator("sngan")
    with pytest.raises(ValueError, match="'bn'.*valid.*'sn', 'wn', 'none'"):
        build_discriminator("resnet32", norm="bn")
    with pytest.raises(TypeError, match="resnet32"):
        build_generator("resnet32", norm="sn")  # G takes no norm


def test_conditional_batchnorm():
    torch.manual_seed(5)
    cbn = ConditionalBatchNorm2d(4, num_classes=3)
    assert cbn.bn.eps == 2e-5   # Chainer's default, as the official code (docs/fidelity.md)
    plain = nn.BatchNorm2d(4, affine=False, eps=2e-5)
    x, y = torch.randn(6, 4, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(cbn(x, y), plain(x))  # gamma = 1, beta = 0 at init
    with torch.no_grad():
        cbn.gamma.weight[1] = 2.0
        cbn.beta.weight[2] = -1.0
    out, ref = cbn(x, y), plain(x)
    torch.testing.assert_close(out[y == 0], ref[y == 0])
    torch.testing.assert_close(out[y == 1], 2 * ref[y == 1])
    torch.testing.assert_close(out[y == 2], ref[y == 2] - 1)
    assert ConditionalBatchNorm2d(4).bn.affine  # unconditional: plain affine BN


def test_exported_generator_round_trip(tmp_path):
    torch.manual_seed(6)
    kwargs = {"num_classes": 3, "ch": 16}
    g = build_generator("resnet32", **kwargs)
    g(torch.randn(4, 128), torch.tensor([0, 1, 2, 0]))  # move BN running stats off their init
    g.eval()
    path = str(tmp_path / "g.safetensors")
    save_generator(path, "resnet32", kwargs, {"G": g}, info={"step": 1})
    loaded, meta = load_generator(path)
    z, y = torch.randn(2, 128), torch.tensor([2, 1])
    torch.testing.assert_close(loaded(z, y), g(z, y))
    assert meta["which"] == "G" and meta["info"] == {"step": 1}


def test_bn_slices_give_per_slice_statistics():
    """model.bn_world: G's BN over slices equals a separate BN per slice (the official per-GPU
    statistics), and the running statistics move to the slices' average."""
    torch.manual_seed(7)
    x = torch.randn(12, 5, 3, 3) * 3 + 1
    ghost = GBatchNorm2d(5)
    ghost.weight.data.uniform_(0.5, 2)
    ghost.bias.data.uniform_(-1, 1)
    ghost.splits = 3
    out = ghost(x)
    refs = [nn.BatchNorm2d(5, eps=2e-5) for _ in range(3)]
    expect = []
    for k, ref in enumerate(refs):
        ref.load_state_dict({k2: v for k2, v in ghost.state_dict().items() if k2 in ("weight", "bias")}, strict=False)
        ref.running_mean.zero_(), ref.running_var.fill_(1)
        expect.append(ref(x[4 * k:4 * k + 4]))
    torch.testing.assert_close(out, torch.cat(expect), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ghost.running_mean, sum(r.running_mean for r in refs) / 3)
    torch.testing.assert_close(ghost.running_var, sum(r.running_var for r in refs) / 3)
    # A generator: every G BN gets the setting; eval mode ignores it.
    g = build_generator("resnet32", num_classes=3, ch=8)
    assert set_bn_splits(g, 2) == 1 + 2 * 3   # final BN + two per block
    g.eval()
    z, y = torch.randn(4, 128), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(g(z, y), (set_bn_splits(g, 1), g(z, y))[1])
