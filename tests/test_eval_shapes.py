"""The shapes10-cnn extractor: trained once and cached, accurate, and its FID separates real data
from class-dropped data by orders of magnitude (the calibration launch.compare --quick relies on)."""

import os

import numpy as np
import pytest
import torch

from data_pipelines.synthetic import render
from eval.extractors import build_extractor
from eval.stats import frechet_distance


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_cache")
    old = os.environ.get("SNGAN_CACHE_DIR")
    os.environ["SNGAN_CACHE_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SNGAN_CACHE_DIR")
    else:
        os.environ["SNGAN_CACHE_DIR"] = old


def stats(ext, indices):
    images, _ = render(indices, 32, 0)
    with torch.no_grad():
        f = torch.cat([ext(images[i:i + 250])[0] for i in range(0, len(images), 250)]).double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def test_trained_once_cached_and_separates_real_from_dropped_classes(cache, capsys):
    from eval.shapes_classifier import held_out_accuracy
    ext = build_extractor("shapes10-cnn")
    assert "trained in" in capsys.readouterr().out
    [cached] = list(cache.glob("shapes10-cnn-*.pt"))
    assert held_out_accuracy(ext.net) >= 0.98 and ext.dim == 64 and ext.num_logits == 10
    again = build_extractor("shapes10-cnn", need_logits=True)  # from the cache: no training
    assert "trained in" not in capsys.readouterr().out and again.family == ext.family
    images, labels = render(range(49000, 49100), 32, 0)
    feats, logits = again(images)
    assert feats.shape == (100, 64) and (logits.argmax(1) == labels).float().mean() >= 0.98

    a, b = stats(ext, range(0, 1000)), stats(ext, range(1000, 2000))
    half = stats(ext, [i for i in range(2000, 4000) if i % 10 < 5])     # classes 0-4 only
    one = stats(ext, range(4000, 14000, 10))                             # class 0 only
    real = frechet_distance(*a, *b)
    half_fid, one_fid = frechet_distance(*a, *half), frechet_distance(*a, *one)
    assert real < 1.0 and 50 * real < half_fid and 5 * half_fid < one_fid and one_fid > 50
    assert np.trace(a[1]) / 64 == pytest.approx(1.0, rel=0.2)  # scaled: real variance ~1 per dimension


def test_unreadable_cache_is_retrained_not_used(cache, capsys):
    build_extractor("shapes10-cnn")
    [cached] = list(cache.glob("shapes10-cnn-*.pt"))
    family = build_extractor("shapes10-cnn").family
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated
    ext = build_extractor("shapes10-cnn")
    err = capsys.readouterr().err
    assert "unreadable" in err and str(cached) in err and ext.family == family  # seeded: the same weights
    assert cached.stat().st_size > 1000
