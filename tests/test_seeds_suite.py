"""The seeds' comparison as its source trains it (launch/experiments/seeds_*.yaml, launch.compare --suite seeds).

Each experiment must carry pytorch-gan-collections' (PGC @ 860e90b) values for its config; the
architectures that are PGC's own (models/seeds.py) must have PGC's layer shapes and parameter counts
(counted from its source files: the numbers below), and the quick sizing of launch.compare must build them.
The golden fixtures (tests/golden/fixtures/seeds_*.npz, tests/test_golden.py) check the training step itself.
"""

from __future__ import annotations

import os

import pytest
import torch

import models
from trainer.build import build_parts, discriminator_kwargs, generator_kwargs
from trainer.config import load_config
from trainer.regularizers import build_constraint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# experiment: (G, D, loss, constraint, batch, G batch, n_dis, z, beta1, flip, dequantize)
PGC = {
    "seeds_dcgan": ("pgc_dcgan32", "pgc_dcgan32", "ns", "none", 128, 256, 1, 100, 0.5, True, False),
    "seeds_wgan": ("cnn32", "cnn32code", "wasserstein", "clip", 128, 256, 1, 100, 0.0, True, False),
    "seeds_wgangp_cnn": ("cnn32", "cnn32code", "wasserstein", "gp", 128, 256, 1, 100, 0.0, True, False),
    "seeds_wgangp_resnet": ("resnet32", "pgc_resnet32", "wasserstein", "gp", 64, 128, 5, 128, 0.0, True, False),
    "seeds_sngan_w_cnn": ("cnn32", "cnn32code", "wasserstein", "sn", 128, 256, 1, 100, 0.0, False, True),
    "seeds_sngan_hinge_resnet": ("resnet32", "resnet32", "hinge", "sn", 64, 128, 5, 128, 0.0, False, True),
    "seeds_sngan_w_resnet": ("resnet32", "resnet32", "wasserstein", "sn", 64, 128, 5, 128, 0.0, False, True),
}

# Parameter counts of PGC's own models at full width, from its source (source/models/*.py):
# dcgan.Generator32(z=100): ConvT 100*1024*2*2 + 1024*512*16 + 512*256*16 + 256*128*16 + 128*3*16 (no biases)
#   + BN 2*(1024+512+256+128)
PGC_DCGAN_G = (100 * 1024 * 4 + 1024 * 512 * 16 + 512 * 256 * 16 + 256 * 128 * 16 + 128 * 3 * 16
               + 2 * (1024 + 512 + 256 + 128))
# dcgan.Discriminator32: convs 3*64*25 + 64*128*25 + 128*256*25 + 256*512*25 (no biases), BN 2*(128+256+512),
#   Linear(2*2*512, 1) with bias
PGC_DCGAN_D = (3 * 64 + 64 * 128 + 128 * 256 + 256 * 512) * 25 + 2 * (128 + 256 + 512) + 2048 + 1
# wgangp.ResDiscriminator32: optimized block (3*128*9 + 128 + 128*128*9 + 128 + 3*128 + 128), a down block
#   (2 * (128*128*9 + 128) + 128*128 + 128), two blocks (2 * (128*128*9 + 128)), Linear(128, 1) with bias
PGC_WGANGP_RES_D = ((3 * 128 * 9 + 128 + 128 * 128 * 9 + 128 + 3 * 128 + 128)
                    + (2 * (128 * 128 * 9 + 128) + 128 * 128 + 128) + 2 * 2 * (128 * 128 * 9 + 128) + 128 + 1)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("exp", sorted(PGC))
def test_seeds_experiment_has_pgc_values_and_builds(exp):
    g, d, loss, constraint, batch, g_batch, n_dis, z, beta1, flip, deq = PGC[exp]
    cfg = load_config(exp)   # validates, and builds G and D on the meta device
    m, o, t, data = cfg.model, cfg.optim, cfg.train, cfg.data
    assert (m.g, m.d, cfg.loss.name, m.d_constraint) == (g, d, loss, constraint)
    assert (t.batch_size, t.g_batch_size, t.n_dis, m.z_dim) == (batch, g_batch, n_dis, z)
    assert (o.name, o.adam, o.eps, o.lr_g, o.lr_d, o.beta1, o.beta2) == ("adam", "torch", 1e-8, 2e-4, 2e-4, beta1, 0.9)
    assert (o.schedule, o.decay_start, o.decay_end, t.steps) == ("linear", 0, 0, 100000)
    assert t.update_order == "d_first" and m.bn_eps == 1e-5 and m.num_classes == 0 and m.z_dist == "normal"
    slope = {"pgc_dcgan32": 0.2, "cnn32code": 0.1}.get(d, 0.0)     # 0: the architecture's own (ResNet: ReLU)
    assert m.g_dense_bn == "channel" and m.d_slope == slope
    assert (data.pixel_scale, data.dequantize, data.random_flip, data.random_crop_ratio) == (127.5, deq, flip, 1.0)
    assert data.resolution == 32
    if constraint == "clip":
        assert cfg.loss.clip_value == 0.1
    if constraint == "gp":
        assert cfg.loss.gp_weight == 10.0
    if constraint == "sn":
        assert (m.n_power_iterations, m.sn_iteration, m.sn_warmup) == (1, "torch", 0)
    with torch.device("meta"):
        G = models.build_generator(m.g, **generator_kwargs(cfg))
        D = models.build_discriminator(m.d, **discriminator_kwargs(cfg, build_constraint(m.d_constraint)))
    assert G.resolution == D.resolution == 32 and G.z_dim == z
    if exp == "seeds_dcgan":
        assert _count(G) == PGC_DCGAN_G and _count(D) == PGC_DCGAN_D
    if exp == "seeds_wgangp_resnet":
        assert _count(D) == PGC_WGANGP_RES_D


def test_pgc_dcgan_shapes_and_bn_placement():
    """PGC's DCGAN at full width, really built: 2x2 after the first transposed conv, 32 px out, no bias
    in G or D's convs, D's BN after the activation from the second conv on, torch-default init."""
    torch.manual_seed(0)
    G = models.build_generator("pgc_dcgan32", z_dim=100)
    D = models.build_discriminator("pgc_dcgan32", norm="none")
    z = torch.randn(3, 100)
    h = G.first(z.view(3, 100, 1, 1))
    assert h.shape == (3, 1024, 2, 2)
    x = G(z)
    assert x.shape == (3, 3, 32, 32) and x.abs().max() <= 1
    assert all(getattr(mod, "bias", None) is None for mod in (G.first, *G.deconvs, G.out))
    kinds = [type(mod).__name__ for mod in D.convs]
    assert kinds == ["Conv2d", "LeakyReLU", "Conv2d", "LeakyReLU", "BatchNorm2d", "Conv2d", "LeakyReLU",
                     "BatchNorm2d", "Conv2d", "LeakyReLU", "BatchNorm2d"]
    convs = [mod for mod in D.convs if isinstance(mod, torch.nn.Conv2d)]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) and c.padding == (2, 2) and c.bias is None for c in convs)
    assert D(x).shape == (3,) and D.head.linear.bias is not None and D.feature_dim == 2 * 2 * 512
    # torch's default init (kaiming-uniform a=sqrt(5): |w| <= 1/sqrt(fan_in)), not N(0, 0.02)
    w = convs[1].weight.detach()
    bound = 1 / (64 * 25) ** 0.5
    assert w.abs().max() <= bound and abs(float(w.std()) - bound / 3 ** 0.5) < 0.05 * bound


def test_pgc_resnet_d_head_bias_is_torch_default():
    torch.manual_seed(0)
    D = models.build_discriminator("pgc_resnet32", norm="none")
    b = D.head.linear.bias
    assert b is not None and b.item() != 0 and abs(b.item()) <= 1 / 128 ** 0.5
    ours = models.build_discriminator("resnet32", norm="none")
    assert ours.head.linear.bias is None and _count(D) == _count(ours) + 1


@pytest.mark.parametrize("exp", sorted(PGC))
def test_seeds_suite_quick_sizing_builds(exp):
    """launch.compare --suite seeds --quick: every row's quick overrides give a valid, buildable config."""
    from launch import compare
    assert [r.exp for r in compare.SUITES["seeds"]] == [
        "seeds_dcgan", "seeds_wgan", "seeds_wgangp_cnn", "seeds_wgangp_resnet", "seeds_sngan_w_cnn",
        "seeds_sngan_w_resnet", "seeds_sngan_hinge_resnet"]
    assert [r.exp for r in compare.SUITES["paper"]][0] == "cifar10_dcgan"
    over = compare.row_overrides(exp, quick=True, steps=5, batch_size=4, data_path=None)
    cfg = load_config(exp, over)
    assert (cfg.model.g_ch, cfg.model.d_ch, cfg.train.batch_size, cfg.data.backend) == (16, 16, 4, "synthetic")
    full = load_config(exp)
    assert compare.base_widths(full) == (full.model.g_ch, full.model.d_ch)
    parts = build_parts(cfg, torch.device("cpu"))
    assert parts.G(torch.randn(2, cfg.model.z_dim)).shape == (2, 3, 32, 32)
    assert parts.D(torch.zeros(2, 3, 32, 32)).shape == (2,)


def test_pixel_transform_is_pgc_sngan():
    """pixel_scale 127.5 with dequantize: x / 127.5 - 1 + U[0, 1/128) (sngan.py:90-93)."""
    from data_pipelines import to_model_range
    px = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    x = to_model_range(px, "cpu", scale=127.5, dequantize=True, generator=g)
    u = torch.rand(px.shape, generator=torch.Generator().manual_seed(0)) / 128
    base = px.float() / 127.5 - 1
    assert torch.equal(x, base + u)
    assert 0 <= float((x - base).min()) and float((x - base).max()) < 1 / 128


def test_make_seeds_refuses_a_wrong_pgc_path(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "tests/golden/make_seeds.py", "--pgc", str(tmp_path),
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "--pgc" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not os.environ.get("SNGAN_PGC"),
                    reason="set SNGAN_PGC to a pytorch-gan-collections clone: this check reruns the reference "
                           "code, which is not in the repository")
def test_make_seeds_regenerates_the_stored_fixture(tmp_path):
    """The stored fixture is what the generator computes from PGC's code (same machine, one thread)."""
    import numpy as np
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "tests/golden/make_seeds.py", "--pgc", os.environ["SNGAN_PGC"],
                           "--out", str(tmp_path), "--rows", "seeds_dcgan"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "seeds_dcgan.npz", allow_pickle=False) as new, \
            np.load(os.path.join(ROOT, "tests", "golden", "fixtures", "seeds_dcgan.npz"), allow_pickle=False) as old:
        assert sorted(new.files) == sorted(old.files)
        for key in old.files:
            assert np.array_equal(new[key], old[key]), key
