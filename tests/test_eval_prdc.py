"""Improved precision/recall and density/coverage (eval/prdc.py), the eval CLI's ``--metrics pr,dc``,
the reference file's ``prdc_features`` and launch.compare's recall criterion.

The metrics are checked against a brute force written here from the papers' definitions (all pairs
at once, distances from explicit differences), on hand-computed cases and with two processes."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from eval import main as eval_main
from launch.compare_score import NO_FINAL_CHECKPOINT, TRAINER_RAISED, RowResult, Scorer, make_scorer, table, verdict
from eval.data import open_source
from eval.extractors import build_extractor
from eval.main import EvalOptions, evaluate, parse_metrics
from eval.prdc import prdc, spread_subset
from eval.reference import compute_reference
from eval.statsfile import StatsError, load_stats, save_stats

from eval_helpers import ROOT, export_generator, free_port, subprocess_env

DATA = "synthetic:32:400"


def brute(real, fake, k):
    """Kynkäänniemi et al. 2019 (Sec. 3: f(phi, Phi) = 1 when phi lies in the closed k-NN ball of some
    phi' in Phi) and Naeem et al. 2020 (eqs. for density and coverage, open balls as in their code)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=2)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=2)
    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=2)   # [generated, real]
    np.fill_diagonal(d_rr, np.inf)                              # a point is not its own neighbour
    np.fill_diagonal(d_ff, np.inf)
    r_real = np.sort(d_rr, axis=1)[:, k - 1]
    r_fake = np.sort(d_ff, axis=1)[:, k - 1]
    return {"precision": float(np.mean([(d_fr[j] <= r_real).any() for j in range(len(fake))])),
            "recall": float(np.mean([(d_fr[:, i] <= r_fake).any() for i in range(len(real))])),
            "density": float(sum((d_fr[j] < r_real).sum() for j in range(len(fake))) / (k * len(fake))),
            "coverage": float(np.mean([d_fr[:, i].min() < r_real[i] for i in range(len(real))]))}


@pytest.mark.parametrize("k,dim,block", [(1, 5, 10), (3, 5, 7), (3, 64, 1024), (5, 16, 33)])
def test_metrics_equal_the_brute_force_of_the_definitions(k, dim, block):
    rng = np.random.default_rng(k * 100 + dim)
    real = rng.normal(size=(97, dim))
    fake = 1.2 * rng.normal(size=(83, dim)) + 0.4
    got = prdc(real, fake, k, device="cpu", block=block)
    want = brute(real, fake, k)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1 and 0 < got["coverage"] < 1  # not a trivial case
    assert prdc(real, fake, k, ("recall",), device="cpu", block=block) == {"recall": want["recall"]}


def test_hand_computed_case_and_ball_boundaries():
    # 1-D, k = 1: every real radius is 1. Fake 4 lies at distance exactly 1 from real 3 (inside the
    # closed ball: precision) and real 2's nearest fake is at exactly its radius (outside the open
    # ball: not covered). Fake radii (k = 1): 2.5, 6, 1, 1.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0], [3.0], [4.0]])
    want = {"precision": 3 / 4, "recall": 1.0, "density": 3 / 4, "coverage": 3 / 4}
    assert prdc(real, fake, 1, device="cpu") == want
    assert brute(real, fake, 1) == want


def test_known_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16))
    # Identical sets: every point is in its own ball; density is exactly 1 (k points of each ball, itself included).
    assert prdc(x, x, 3, device="cpu") == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    # Far apart: nothing inside anything.
    assert prdc(x, x + 100.0, 3, device="cpu") == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    # One mode of two: precise, but half the real set is never reached.
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) + 50.0
    real = np.concatenate([a, b])
    fake = rng.normal(size=(200, 16))
    got = prdc(real, fake, 3, device="cpu")
    assert got == pytest.approx(brute(real, fake, 3), abs=1e-12)
    both = prdc(real, np.concatenate([fake, rng.normal(size=(200, 16)) + 50.0]), 3, device="cpu")
    assert got["recall"] == pytest.approx(both["recall"] / 2, abs=0.06) and 0.3 < got["recall"] <= 0.5
    assert got["coverage"] <= 0.5 and got["precision"] > 0.7
    print("one mode of two:", got, "both modes:", both)


def test_bad_input_is_refused():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="more than 3 real samples, got 3"):
        prdc(x, np.ones((10, 4)), 3, device="cpu")
    with pytest.raises(ValueError, match="different shapes"):
        prdc(np.ones((10, 4)), np.ones((10, 5)), 3, device="cpu")
    with pytest.raises(ValueError, match="non-finite"):
        prdc(np.full((10, 4), np.nan), np.ones((10, 4)), 3, device="cpu")
    assert spread_subset(10, 4).tolist() == [0, 2, 5, 7] and spread_subset(3, 10).tolist() == [0, 1, 2]
    assert parse_metrics("fid,pr,recall,dc") == ("fid", "precision", "recall", "density", "coverage")
    with pytest.raises(ValueError, match="unknown.*groups: pr=precision,recall"):
        parse_metrics("fid,prc")


PROBE = """
import json, sys
import numpy as np
from trainer import dist
from eval.prdc import prdc
dist.init()
z = np.load(sys.argv[1])
res = prdc(z["real"], z["fake"], 3, block=16)
if dist.is_main():
    with open(sys.argv[2], "w") as fh:
        json.dump({"world_size": dist.world_size(), **res}, fh)
"""


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tmp_path):
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(101, 8)), rng.normal(size=(77, 8)) + 0.3   # 7 and 5 blocks of 16
    np.savez(tmp_path / "f.npz", real=real, fake=fake)
    (tmp_path / "probe.py").write_text(PROBE)
    out = tmp_path / "two.json"
    proc = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           str(tmp_path / "probe.py"), str(tmp_path / "f.npz"), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two.pop("world_size") == 2
    assert two == prdc(real, fake, 3, device="cpu", block=16) == pytest.approx(brute(real, fake, 3), abs=1e-12)


# ----------------------------------------------------------------------------- the evaluator

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prdc")
    ext = build_extractor("tiny-test")
    ref = compute_reference(open_source(DATA), ext, str(tmp / "ref.npz"), prdc_features=150, workers=0, spec=DATA)
    gen = export_generator(tmp / "g.safetensors", num_classes=10, name="resnet32")  # non-constant images
    return tmp, ext, ref, gen


def features_of(ext, images):
    with torch.no_grad():
        return ext(images)[0].double().numpy()


def test_reference_file_keeps_an_even_spread_of_features(env):
    tmp, ext, ref, _ = env
    r = load_stats(ref)
    assert r.n == 400 and not r.has_features and r.has_prdc_features
    index = spread_subset(400, 150)
    assert np.array_equal(r._npz["prdc_index"], index)
    images, _ = __import__("data_pipelines.synthetic", fromlist=["render"]).render(index.tolist(), 32, 0)
    np.testing.assert_allclose(r.prdc_features(150), features_of(ext, images), rtol=1e-6, atol=1e-6)
    assert r.prdc_features(50).shape == (50, 16)
    # An old file (moments only) is still valid; precision/recall ask for features with the fix.
    plain = str(tmp / "plain.npz")
    save_stats(plain, r.mu, r.sigma, r.n, extractor=r.extractor, resolution=32)
    assert not load_stats(plain).has_prdc_features
    with pytest.raises(StatsError, match="no features, which precision/recall/density/coverage need.*--prdc-features"):
        evaluate(env[3], plain, ext, EvalOptions(("recall",), 100, batch_size=50))
    # --keep-features files serve too (their features, evenly subsampled).
    full = compute_reference(open_source(DATA), ext, str(tmp / "full.npz"), keep_features=True, workers=0)
    np.testing.assert_array_equal(load_stats(full).prdc_features(150), r.prdc_features(150))


def test_cli_metrics_equal_the_brute_force_of_independent_features(env, capsys):
    tmp, ext, _, gen = env
    n = 240
    # The reference: 300 images of the same generator with other noise (PNGs, as a data folder), so that
    # the values are neither 0 nor 1; random weights are far from the synthetic data.
    subprocess.run([sys.executable, "-m", "eval.sample", gen, "--num", "300", "--seed", "1", "--out",
                    str(tmp / "other")], check=True, cwd=ROOT, env=subprocess_env(), capture_output=True, timeout=300)
    ref = compute_reference(open_source(str(tmp / "other")), ext, str(tmp / "gen-ref.npz"), prdc_features=120,
                            workers=0)
    assert eval_main.main(["--ckpt", gen, "--ref", ref, "--extractor", "tiny-test", "--metrics", "fid,pr,dc",
                           "--num-samples", str(n), "--prdc-num", "120", "--batch-size", "50"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["prdc_k"] == 3 and res["prdc_num_samples"] == 120 and res["prdc_ref_num"] == 120
    # The generated side, independently: eval.sample's images (same plan and noise) through the extractor.
    subprocess.run([sys.executable, "-m", "eval.sample", gen, "--num", str(n), "--out", str(tmp / "s.npz")],
                   check=True, cwd=ROOT, env=subprocess_env(), capture_output=True, timeout=300)
    images = torch.from_numpy(np.load(tmp / "s.npz")["arr_0"]).permute(0, 3, 1, 2)
    fake = features_of(ext, images)[spread_subset(n, 120)]
    real = load_stats(ref).prdc_features(120)
    want = brute(real, fake, 3)
    assert {k: res[k] for k in want} == pytest.approx(want, abs=1e-12)
    assert 0 < res["precision"] < 1 and 0 < res["recall"] < 1 and 0 < res["coverage"] < 1 and res["density"] > 0
    # With KID (all features kept) the same subset is used: the same numbers.
    full = compute_reference(open_source(str(tmp / "other")), ext, str(tmp / "gen-full.npz"), keep_features=True,
                             workers=0)
    both = evaluate(gen, full, ext, EvalOptions(("kid", "recall", "coverage"), n, batch_size=50, kid_subsets=2,
                                                kid_subset_size=50, prdc_num=120))
    assert both["recall"] == res["recall"] and both["coverage"] == res["coverage"]
    # Bad values: exit 2 with one line.
    assert eval_main.main(["--ckpt", gen, "--ref", ref, "--extractor", "tiny-test", "--metrics", "pr",
                           "--num-samples", "3"]) == 2
    assert "need more than 3 samples" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_with_two_processes_gives_the_numbers_of_one(env):
    tmp, ext, ref, gen = env
    n = 151   # odd: the ranks' slices differ in size
    one = evaluate(gen, ref, ext, EvalOptions(("precision", "recall", "density", "coverage"), n, batch_size=32))
    out = tmp / "two.json"
    proc = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           os.path.join(ROOT, "eval", "main.py"), "--ckpt", gen, "--ref", ref, "--extractor",
                           "tiny-test", "--metrics", "pr,dc", "--num-samples", str(n), "--batch-size", "32",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2
    for key in ("precision", "recall", "density", "coverage", "prdc_num_samples", "prdc_ref_num"):
        assert two[key] == one[key], key
    # The reference's prdc_features from two processes: the same rows, gathered in index order.
    ref2 = tmp / "ref2.npz"
    proc = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           os.path.join(ROOT, "eval", "reference.py"), "--data", DATA, "--out", str(ref2),
                           "--extractor", "tiny-test", "--prdc-features", "150", "--workers", "0"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_stats(ref), load_stats(str(ref2))
    assert b.info["world_size"] == 2 and a.cache_key == b.cache_key
    np.testing.assert_array_equal(b.prdc_features(150), a.prdc_features(150))
    np.testing.assert_array_equal(b._npz["prdc_index"], a._npz["prdc_index"])


# ----------------------------------------------------------------------------- launch.compare's criterion

def scored(exit=0, error=None, **scores):
    return RowResult(name="DCGAN", exp="cifar10_dcgan", loss="ns", constraint="none", n_dis=1, steps=1, run_dir="r",
                     overrides=[], exit=exit, error=error, train_seconds=1.0, scores=scores)


def test_compare_verdict_uses_recall():
    ok = {"fid": 3.0, "recall": 0.6, "variance_ratio": 0.05}
    assert verdict(scored(**ok), 5.0, 0.25) == "works"       # a low variance ratio no longer decides
    assert verdict(scored(**{**ok, "recall": 0.2, "variance_ratio": 1.0}), 5.0, 0.25) == \
        "does not work (collapsed: recall 0.20 < 0.25)"
    assert verdict(scored(**{**ok, "fid": 7.0}), 5.0, 0.25) == "does not work (FID >= 5)"
    assert verdict(scored(**{**ok, "recall": None}), 5.0, 0.25).startswith("failed (no recall")
    assert verdict(scored(exit=1), 5.0, 0.25) == "does not work (diverged: non-finite loss)"
    assert verdict(scored(exit=TRAINER_RAISED, error="KeyError: x"), 5.0, 0.25) == "failed (KeyError: x)"
    assert verdict(scored(exit=NO_FINAL_CHECKPOINT), 5.0, 0.25) == "failed (trainer exit -1)"
    args = argparse.Namespace(extractor="tiny-test", quick=True, num_samples=100, fid_threshold=5.0, min_recall=0.25,
                              overrides=[])
    row = scored(**ok, precision=0.7)
    row.verdict = verdict(row, 5.0, 0.25)
    text = table([row], args, None)
    assert "| precision | recall | var. ratio | works? |" in text and "| 0.70 | 0.60 | 0.05 | works |" in text
    assert "recall >= 0.25" in text
    flat = row.to_json()   # compare.json's row: the scores flattened beside the row's fields, as before
    assert flat["exit"] == 0 and flat["fid"] == 3.0 and flat["verdict"] == "works" and "scores" not in flat
    assert "error" not in flat and "grid" not in flat
    from launch import compare
    assert compare.main(["--suite", "paper", "--quick", "--min-recall", "1.5", "--rows", "cifar10_dcgan"]) == 2


def test_scorer_recall_detects_a_collapsed_set_of_real_images(env):
    """Real images as the 'generator': held-out images of every class pass, images of one class of ten fail."""
    tmp, ext, _, _ = env
    from data_pipelines.synthetic import render
    source = open_source("synthetic:32:1000")
    scorer = Scorer(ext, 300, batch_size=100)
    scorer.set_reference(source, str(tmp / "compare-ref.npz"))
    assert scorer.ref_prdc.shape == (300, 16)
    floor = scorer.score(*scorer.real_stats(source, 300))          # 300 more images of all classes
    idx = torch.arange(0, 3000, 10)                                  # class 0 only (labels are index % 10)
    collapsed = scorer.score(*scorer._collect([(render(idx.tolist(), 32, 0)[0], torch.arange(300))], False))
    print("real floor:", floor, "one class:", collapsed)
    held_out = features_of(ext, render(range(300, 600), 32, 0)[0])
    assert {k: floor[k] for k in ("precision", "recall")} == pytest.approx(
        {k: v for k, v in brute(scorer.ref_prdc, held_out, 3).items() if k in ("precision", "recall")}, abs=1e-12)
    assert floor["recall"] > 0.5 and collapsed["recall"] < 0.25
    assert verdict(scored(**{**collapsed, "fid": 0.0}), 1e9, 0.25).startswith("does not work (collapsed")
    # The cached reference is reused, features included.
    again = Scorer(ext, 300, batch_size=100)
    again.set_reference(source, str(tmp / "compare-ref.npz"))
    np.testing.assert_array_equal(again.ref_prdc, scorer.ref_prdc)
    # --ref without features cannot give recall: refused before any scoring.
    plain = str(tmp / "plain-compare.npz")
    save_stats(plain, *scorer.ref, 300, extractor=ext.family, resolution=32)
    args = argparse.Namespace(extractor="tiny-test", num_samples=300, seed=0, ref=plain, floor_data=None, no_floor=True)
    with pytest.raises(ValueError, match="holds no features, which the 'works' criterion's recall needs"):
        make_scorer(args, [])
