"""eval/: Frechet distance, IS, KID, sufficient statistics, TF1 resize, stats files, sample plans."""

import numpy as np
import pytest
import torch

from trainer import dist
from eval.extractors import build_extractor, resize_bilinear_tf1
from eval.generate import Plan, balanced_counts, rank_batches, sample_noise, to_uint8
from eval.stats import SufficientStats, frechet_distance, inception_score, kernel_inception_distance
from eval.statsfile import StatsError, load_stats, save_stats


def random_stats(rng, d, n):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_equals_torch_fidelity():
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    rng = np.random.default_rng(0)
    for d, n in ((8, 50), (64, 300), (64, 40)):  # the last one rank-deficient (n < d)
        mu1, s1 = random_stats(rng, d, n)
        mu2, s2 = random_stats(rng, d, n)
        ours = frechet_distance(mu1, s1, mu2, s2)
        theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)[KEY_METRIC_FID]
        assert ours == pytest.approx(theirs, rel=1e-6)


def test_frechet_distance_analytic_diagonal_gaussians():
    # N(m1, diag(a)) vs N(m2, diag(b)): FID = |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    m1, m2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.5, -1.0])
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 9.0])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(m1, np.diag(a), m1, np.diag(a)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_refuses_other_dimensions():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_sufficient_statistics_match_numpy_and_groups_sum_to_total():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((101, 6)).astype(np.float32) + 5.0
    groups = torch.from_numpy(rng.integers(0, 3, 101))
    whole, by_group = SufficientStats(6), SufficientStats(6, groups=3)
    for chunk in np.array_split(np.arange(101), 7):
        whole.add(torch.from_numpy(x[chunk]))
        by_group.add(torch.from_numpy(x[chunk]), groups[chunk])
    mu, sigma = whole.mean_cov()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(by_group.merged().buf, whole.buf, rtol=1e-12)
    g1 = x[groups.numpy() == 1].astype(np.float64)
    mu1, sigma1 = by_group.mean_cov(1)
    np.testing.assert_allclose(mu1, g1.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma1, np.cov(g1, rowvar=False), rtol=1e-9, atol=1e-12)


def test_inception_score_equals_torch_fidelity():
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    logits = torch.randn(503, 20, generator=torch.Generator().manual_seed(0)) * 3
    mean, std = inception_score(logits, splits=10)
    theirs = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert mean == pytest.approx(theirs[KEY_METRIC_ISC_MEAN], rel=1e-9)
    assert std == pytest.approx(theirs[KEY_METRIC_ISC_STD], rel=1e-6)
    # One class everywhere: IS is 1.
    assert inception_score(torch.tensor([[10.0, -10.0]] * 20), splits=2)[0] == pytest.approx(1.0, abs=1e-6)


def test_kid_equals_torch_fidelity():
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(300, 32, generator=g), torch.randn(250, 32, generator=g) * 1.2 + 0.3
    mean, std = kernel_inception_distance(f1, f2, subsets=7, subset_size=100)
    theirs = kid_features_to_metric(f1, f2, kid_subsets=7, kid_subset_size=100, verbose=False, rng_seed=2020,
                                    kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                    kid_kernel_poly_coef0=1)
    # torch-fidelity computes the kernels in float32, we in float64
    assert mean == pytest.approx(theirs[KEY_METRIC_KID_MEAN], rel=1e-4)
    assert std == pytest.approx(theirs[KEY_METRIC_KID_STD], rel=1e-3)
    with pytest.raises(ValueError, match="subset size"):
        kernel_inception_distance(f1, f2, subsets=1, subset_size=1000)


@pytest.mark.parametrize("h,w", [(32, 32), (48, 40), (128, 128), (299, 299), (400, 320)])
def test_resize_matches_torch_fidelity_tf1_bilinear(h, w):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = torch.randint(0, 256, (2, 3, h, w), generator=torch.Generator().manual_seed(h)).float()
    theirs = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.allclose(resize_bilinear_tf1(x), theirs, atol=2e-2, rtol=0)  # grey levels of 0..255


def test_stats_file_roundtrip_and_pytorch_fid_readable(tmp_path):
    rng = np.random.default_rng(2)
    mu, sigma = random_stats(rng, 5, 40)
    classes = [(c, mu + c, sigma * (c + 1), 10 + c) for c in range(3)]
    path = str(tmp_path / "s.npz")
    save_stats(path, mu, sigma, 40, extractor="tiny-test/v1", resolution=32, cache_key="k",
               features=rng.standard_normal((40, 5)), class_stats=iter(classes), num_classes=3)
    with np.load(path) as f:  # what pytorch-fid / torch-fidelity read
        np.testing.assert_array_equal(f["mu"], mu)
        np.testing.assert_array_equal(f["sigma"], sigma)
    ref = load_stats(path)
    assert (ref.n, ref.dim, ref.extractor, ref.resolution, ref.num_classes) == (40, 5, "tiny-test/v1", 32, 3)
    m2, s2, n2 = ref.class_stats(2)
    np.testing.assert_array_equal(m2, mu + 2)
    np.testing.assert_array_equal(s2, sigma * 3)
    assert n2 == 12 and ref.features().shape == (40, 5)
    ref.check_compatible("tiny-test/v1", 5)
    with pytest.raises(StatsError, match="tf-inception.*recompute"):
        ref.check_compatible("tf-inception-2015-12-05/pool3", 5)
    with pytest.raises(StatsError, match="5-dimensional.*2048"):
        load_stats(path).check_compatible("tiny-test/v1", 2048)
    # a foreign file (mu/sigma only) passes the family check but not a wrong dimension
    np.savez(tmp_path / "foreign.npz", mu=mu, sigma=sigma)
    load_stats(str(tmp_path / "foreign.npz")).check_compatible("tf-inception-2015-12-05/pool3", 5)
    with pytest.raises(StatsError, match="KID"):
        load_stats(str(tmp_path / "foreign.npz")).features()
    with pytest.raises(StatsError, match="do not exist"):
        load_stats(str(tmp_path / "missing.npz"))


def test_plans_are_balanced_exact_and_rank_independent():
    assert balanced_counts(25, 10) == [3] * 5 + [2] * 5
    assert balanced_counts(7, 0) == [7]
    plan = Plan(balanced_counts(25, 10), True, seed=3)
    seen = []
    for r in range(3):  # emulate 3 ranks: disjoint slices covering everything once
        s, e = dist.exact_slice(plan.total, r, 3)
        seen += list(range(s, e))
    assert seen == list(range(25))
    idx, cls, within = next(rank_batches(plan, 0, plan.total, 100))
    assert cls.tolist() == [c for c in range(10) for _ in range(plan.counts[c])]
    z_all = sample_noise(3, cls.tolist(), within.tolist(), 8)
    z_some = sample_noise(3, cls[5:9].tolist(), within[5:9].tolist(), 8)
    assert torch.equal(z_all[5:9], z_some)  # noise is per sample, not per batch or rank
    assert not torch.equal(sample_noise(4, [0], [0], 8), sample_noise(3, [0], [0], 8))
    assert to_uint8(torch.tensor([-1.0, -0.999, 0.0, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]


def test_tiny_extractor_is_deterministic_and_has_logits():
    a, b = build_extractor("tiny-test"), build_extractor("tiny-test")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    fa, la = a(x)
    fb, lb = b(x)
    assert fa.shape == (4, 16) and la.shape == (4, 10)
    assert torch.equal(fa, fb) and torch.equal(la, lb)
    with pytest.raises(ValueError, match="uint8"):
        a(x.float())
    with pytest.raises(ValueError, match="unknown feature extractor.*tiny-test"):
        build_extractor("nope")
