"""Inputs checked before any work (issue 17): configs, data, evaluator inputs, SLURM requests.

One rule everywhere: bad input gets exit 2 and one line naming the value and the remedy; a bad
sample inside good data is skipped, counted and named; nothing is computed on garbage. Each test
names the fault of docs/reliability.md it proves.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY
from data_pipelines import DataConfig, build_train_stream, fakedata
from data_pipelines.sources import open_source as open_raw
from data_pipelines.tario import index_path
from data_pipelines.writer import PrepareOptions, prepare

MAIN = os.path.join(ROOT, "trainer", "main.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def trainer(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**ENV, **(env or {})}, timeout=timeout)


def one_line_error(proc):
    """Exit 2 with a one-line message and no traceback."""
    err = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("[trainer] run folder",))]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return err[-1]


# ------------------------------------------------------------------------------ configs

@pytest.mark.parametrize("override, words", [
    ("data.resolution=64", ["data.resolution=64", "32x32"]),
    ("model.z_dim=0", ["model.z_dim", ">= 1"]),
    ("model.z_dim=-5", ["model.z_dim", "-5"]),
    ("model.g_ch=-4", ["model.g_ch", "-4"]),
    ("data.resolution=-32", ["data.resolution", "-32"]),
    ("train.g_batch_size=100000000000", ["train.g_batch_size", "a typo"]),
    ("loss.gp_weight=nan", ["loss.gp_weight", "finite"]),
    ("optim.beta2=1.5", ["optim.beta2", "< 1"]),
    ("model.g=resnet48", ["resnet48", "48x48", "data.resolution=32"]),
    ("data.verify=sometimes", ["data.verify", "off, quick, full"]),
])
def test_bad_config_values_are_one_line_exit_2(override, words, capsys):
    """Fault: negative sizes, z_dim 0, huge batches, impossible resolutions."""
    from trainer.main import main
    assert main(["--dry-run", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_unsafe_and_malformed_yaml_experiments(tmp_path, capsys):
    """Fault: a YAML file with !!python/object tags and a malformed one ended in exit-1 tracebacks."""
    from trainer.main import main
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("train: !!python/object/apply:os.system ['touch hacked']\n")
    assert main(["--exp", str(tagged), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "tagged.yaml" in err and "python/object" in err and not (tmp_path / "hacked").exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1, 2\n")
    assert main(["--exp", str(broken), "--dry-run"]) == 2
    assert "broken.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_mixed_precision_is_mapped_and_recorded_or_refused(tmp_path):
    """Fault: `accelerate launch --mixed_precision bf16` autocast D while config.yaml said fp32."""
    proc = trainer("--out", str(tmp_path / "a"), *TINY, "train.steps=1", env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert proc.returncode == 0, proc.stderr
    assert "mixed_precision=bf16" in proc.stdout and "train.precision=bf16" in proc.stdout
    assert "precision: bf16" in (tmp_path / "a" / "config.yaml").read_text()
    proc = trainer("--out", str(tmp_path / "b"), *TINY, "train.steps=1", "train.precision=fp16",
                   env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    line = one_line_error(proc)
    assert "train.precision=fp16 conflicts" in line and "bf16" in line
    assert not (tmp_path / "b" / "config.yaml").exists()


# ------------------------------------------------------------------------------ data

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """32 px CIFAR-like shards (manifest with header hashes), 5 shards of 8."""
    root = tmp_path_factory.mktemp("inputs")
    fakedata.make_cifar10(root / "raw", per_batch=8, batches=5, test=2)
    prepare(open_raw("cifar10", str(root / "raw"), "train"), root / "clean",
            PrepareOptions(samples_per_shard=8, progress=False))
    return root


def copy_set(root, name):
    dst = root / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(root / "clean", dst)
    return dst


@pytest.mark.slow
def test_data_that_does_not_fit_the_model_is_refused_before_training(shards, tmp_path):
    """Faults: resnet48 on 32 px shards, resnet128 on 32 px data (upsampled silently)."""
    data = ["data.backend=webdataset", f"data.path={shards / 'clean'}", "data.num_workers=0"]
    line = one_line_error(trainer("--out", str(tmp_path / "r48"), *TINY, *data, "model.g=resnet48",
                                  "model.d=resnet48", "data.resolution=48", "train.steps=1"))
    assert "32x32" in line and "data.resolution=48" in line and "upsample" in line
    assert not (tmp_path / "r48" / "config.yaml").exists()
    line = one_line_error(trainer("--out", str(tmp_path / "c10"), *TINY, *data, "model.num_classes=7",
                                  "train.steps=1"))
    assert "model.num_classes=7" in line and "10 classes" in line


def test_verify_finds_a_shard_replaced_by_another_and_a_zero_byte_one(shards):
    """Fault: a shard replaced by a same-size copy of another was read twice; the manifest's hashes
    were never checked."""
    from data_pipelines.verify import main as verify_main, verify_folder
    bad = copy_set(shards, "copied")
    (bad / "shard-000003.tar").write_bytes((bad / "shard-000001.tar").read_bytes())
    (bad / "shard-000004.tar").write_bytes(b"")
    total, faults = verify_folder(bad, "quick")
    assert total == 5 and [os.path.basename(p) for p, _ in faults] == ["shard-000003.tar", "shard-000004.tar"]
    total, faults = verify_folder(bad, "full", workers=2)
    assert len(faults) == 2
    assert verify_main([str(bad), "--quiet"]) == 2
    assert verify_main([str(shards / "clean"), "--quiet", "--level", "quick"]) == 0


@pytest.mark.slow
def test_trainer_refuses_mismatching_shards_and_all_unreadable_data(shards, tmp_path):
    """Faults: a copied shard trained on silently; all shards unreadable gave a DataLoader traceback."""
    bad = copy_set(shards, "copied2")
    (bad / "shard-000002.tar").write_bytes((bad / "shard-000000.tar").read_bytes())
    data = ["data.backend=webdataset", f"data.path={bad}", "data.num_workers=1"]
    line = one_line_error(trainer("--out", str(tmp_path / "a"), *TINY, *data, "train.steps=1"))
    assert "shard-000002.tar" in line and "data.verify=off" in line
    garbage = copy_set(shards, "garbage")
    for shard in garbage.glob("*.tar"):
        shard.write_bytes(os.urandom(shard.stat().st_size))
        index_path(shard).unlink()
    line = one_line_error(trainer("--out", str(tmp_path / "b"), *TINY, "data.backend=webdataset",
                                  f"data.path={garbage}", "data.num_workers=1", "train.steps=1"))
    assert "5 of 5 data files" in line
    line = one_line_error(trainer("--out", str(tmp_path / "c"), *TINY, "data.backend=webdataset",
                                  f"data.path={garbage}", "data.num_workers=1", "train.steps=1", "data.verify=off"))
    assert "no readable sample" in line and "data_pipelines.verify" in line


def _stream_all(path, caplog, num_classes=None):
    cfg = DataConfig(backend="webdataset", path=str(path), resolution=32, num_workers=0, shuffle_buffer=4, verify="off")
    stream = build_train_stream(cfg, batch_size=4, rank=0, world_size=1, seed=0)
    it = iter(stream)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.wds"):
        labels = torch.cat([next(it)[1] for _ in range(12)])   # more than one epoch of what is left
    return stream, labels


def test_shards_that_lose_samples_are_always_reported_with_the_count(shards, caplog):
    """Fault: a zero-byte shard and a damaged shard without index skipped their samples silently."""
    bad = copy_set(shards, "damaged")
    (bad / "shard-000000.tar").write_bytes(b"")
    tail = bad / "shard-000001.tar"
    tail.write_bytes(tail.read_bytes()[:3000])
    index_path(tail).unlink()
    stream, _ = _stream_all(bad, caplog)
    text = caplog.text
    assert "shard-000000.tar" in text and "shard-000001.tar" in text
    assert "0 of its 8 samples for this reader are readable" in text
    assert stream.skipped >= 8 + 1


def test_labels_outside_the_classes_are_skipped_and_named(shards, caplog):
    """Fault: a label outside [0, num_classes) ended in an IndexError without the shard or sample."""
    bad = copy_set(shards, "labels")
    shard = bad / "shard-000002.tar"
    index = np.load(index_path(shard))
    index[3, 2] = 12                                     # label 12 of 10 classes, in the index
    np.save(index_path(shard), index)
    _, labels = _stream_all(bad, caplog)
    assert labels.max() < 10 and labels.min() >= 0
    assert "shard-000002.tar" in caplog.text and "outside [0, 10)" in caplog.text and "label 12" in caplog.text


# ------------------------------------------------------------------------------ evaluator

@pytest.fixture(scope="module")
def evalenv(tmp_path_factory):
    from eval.data import open_source
    from eval.extractors import build_extractor
    from eval.reference import compute_reference
    tmp = tmp_path_factory.mktemp("evalinputs")
    ext = build_extractor("tiny-test")
    ref = compute_reference(open_source("synthetic:32:300"), ext, str(tmp / "ref.npz"), per_class=True,
                            workers=0, spec="synthetic:32:300")
    return tmp, ref


def run_eval(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=300)


def _write_stats(path, mu, sigma, **kw):
    from eval.statsfile import save_stats
    save_stats(str(path), mu, sigma, 100, extractor="tiny-test/v1", resolution=32, **kw)


def test_garbage_statistics_are_refused_on_load(evalenv):
    """Faults: NaN mu gave FID NaN, a non-PSD covariance FID -5.94, NaN class means intra-FID NaN."""
    from eval.statsfile import StatsError, load_stats
    tmp, ref = evalenv
    r = load_stats(ref)
    mu, sigma = r.mu.copy(), r.sigma.copy()
    nan_mu = mu.copy()
    nan_mu[3] = np.nan
    _write_stats(tmp / "nan.npz", nan_mu, sigma)
    with pytest.raises(StatsError, match="mu holds 1 non-finite"):
        load_stats(str(tmp / "nan.npz"))
    not_psd = sigma - 3 * np.eye(len(mu)) * np.trace(sigma) / len(mu)
    _write_stats(tmp / "notpsd.npz", mu, not_psd)
    with pytest.raises(StatsError, match="not positive semi-definite"):
        load_stats(str(tmp / "notpsd.npz"))
    asym = sigma.copy()
    asym[0, 1] += 1.0
    _write_stats(tmp / "asym.npz", mu, asym)
    with pytest.raises(StatsError, match="not symmetric"):
        load_stats(str(tmp / "asym.npz"))
    classes = [(c, *r.class_stats(c)) for c in range(r.num_classes)]
    classes[2] = (2, np.full_like(mu, np.nan), classes[2][2], classes[2][3])
    _write_stats(tmp / "nanclass.npz", mu, sigma, class_stats=iter(classes), num_classes=r.num_classes)
    with pytest.raises(StatsError, match="per-class means"):
        load_stats(str(tmp / "nanclass.npz"))
    proc = run_eval("eval.fid", str(tmp / "notpsd.npz"), ref)
    assert proc.returncode == 2 and "not positive semi-definite" in proc.stderr and "Traceback" not in proc.stderr


def test_nan_generator_is_refused_not_scored(evalenv, tmp_path):
    """Fault: G_ema with NaN weights made black images that scored FID 1.43 with exit 0."""
    from eval_helpers import export_generator
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    _, ref = evalenv
    path = export_generator(tmp_path / "g.safetensors")
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    for k in tensors:
        if k.startswith("G_ema.") and tensors[k].is_floating_point():
            tensors[k] = torch.full_like(tensors[k], float("nan"))
    save_file(tensors, path, metadata=meta)
    proc = run_eval("eval.main", "--ckpt", path, "--ref", ref, "--extractor", "tiny-test", "--num-samples", "50")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "non-finite pixels" in proc.stderr and '"fid"' not in proc.stdout
    ok = run_eval("eval.main", "--ckpt", path, "--ref", ref, "--extractor", "tiny-test", "--num-samples", "50",
                  "--which", "G")
    assert ok.returncode == 0 and json.loads(ok.stdout.strip().splitlines()[-1])["num_samples"] == 50


def test_small_n_is_one_policy_compute_warn_and_state_n(evalenv, tmp_path):
    """Fault: intra_fid with 2 per class computed silently while fid refused N < dim."""
    from eval_helpers import export_generator
    _, ref = evalenv
    gen = export_generator(tmp_path / "g.safetensors")
    proc = run_eval("eval.main", "--ckpt", gen, "--ref", ref, "--extractor", "tiny-test", "--metrics",
                    "fid,intra_fid", "--num-samples", "10", "--per-class", "2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_samples"] == 10 and result["per_class"] == 2 and result["ref_num_images"] == 300
    assert np.isfinite(result["fid"]) and np.isfinite(result["intra_fid"])
    assert "FID from 10 samples" in proc.stderr and "intra-FID from 2 samples per class" in proc.stderr


def test_evaluator_input_mistakes_are_one_line_exit_2(evalenv, tmp_path):
    """Faults: a missing file, config.yaml as --ckpt, an unknown metric, a folder without images:
    each was an exit-1 traceback."""
    _, ref = evalenv
    (tmp_path / "config.yaml").write_text("model: {g: resnet32}\n")
    (tmp_path / "empty").mkdir()
    cases = [
        (("eval.main", "--ckpt", str(tmp_path / "missing"), "--ref", ref, "--extractor", "tiny-test"), "missing"),
        (("eval.main", "--ckpt", str(tmp_path / "config.yaml"), "--ref", ref, "--extractor", "tiny-test"),
         "config.yaml"),
        (("eval.main", "--ckpt", str(tmp_path / "config.yaml"), "--ref", ref, "--metrics", "fid,precison",
          "--extractor", "tiny-test"), "precison"),
        (("eval.fid", str(tmp_path / "empty"), ref, "--extractor", "tiny-test"), "no images"),
        (("eval.reference", "--data", str(tmp_path / "nothere"), "--extractor", "tiny-test"), "nothere"),
        (("eval.batch", str(tmp_path / "norun"), "--extractor", "tiny-test"), "does not exist"),
    ]
    for args, word in cases:
        proc = run_eval(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and word in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)


def test_undecodable_image_in_a_folder_is_skipped_counted_and_named(tmp_path):
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(30):
        Image.fromarray(fakedata.pattern(i, 32, 32)).save(folder / f"{i:03d}.png")
    (folder / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    proc = run_eval("eval.fid", str(folder), "synthetic:32:40", "--extractor", "tiny-test", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 image(s)" in proc.stderr and "zz-broken.png" in proc.stderr and "FID:" in proc.stdout


@pytest.mark.slow
def test_run_path_with_brackets_and_pruned_checkpoints_under_watch(evalenv, tmp_path):
    """Faults: a run path with [1] evaluated nothing; --watch missed pruned checkpoints silently."""
    _, ref = evalenv
    run = tmp_path / "run[1]"
    proc = subprocess.run([sys.executable, MAIN, "--out", str(run), *TINY, "train.steps=6", "train.ckpt_every=2",
                           "train.keep_ckpts=1"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = run_eval("eval.batch", str(run), "--ref", ref, "--extractor", "tiny-test", "--num-samples", "40")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in records if "fid" in r] == ["ckpt-000000006"]
    assert sorted(r["checkpoint"] for r in records if r.get("skipped")) == ["ckpt-000000002", "ckpt-000000004"]
    assert "pruned" in proc.stderr


# ------------------------------------------------------------------------------ SLURM launcher

def test_slurm_request_checks_before_submission(tmp_path, capsys, monkeypatch):
    """Faults: 8 CPUs per task on 2-CPU nodes pended forever; --gpus-per-node 3 with batch 64 exited 0
    in --dry-run; no SLURM on the machine ended in a traceback."""
    from launch import preflight, slurm
    part = preflight.Partition("debug", [preflight.Node("n1", 2, 4096, 0), preflight.Node("n2", 2, 4096, 0)])
    with pytest.raises(preflight.PreflightError, match="8 CPUs.*at most 2.*--cpus-per-task"):
        preflight.check_allocation(part, 2, 1, 8, 0, None, 60)
    with pytest.raises(preflight.PreflightError, match="--gpus-per-node 1.*at most 0 GPU"):
        preflight.check_allocation(part, 1, 1, 1, 1, None, 60)
    with pytest.raises(preflight.PreflightError, match="--nodes 3.*only 2"):
        preflight.check_allocation(part, 3, 1, 1, 0, None, 60)
    with pytest.raises(preflight.PreflightError, match="--mem 8G"):
        preflight.check_allocation(part, 1, 1, 1, 0, "8G", 60)
    preflight.check_allocation(part, 2, 1, 2, 0, "2G", 60)
    assert preflight.is_fatal("PartitionConfig") and not preflight.is_fatal("Resources")
    # --dry-run checks the world size against the batch like the trainer would.
    rc = slurm.main(["--nodes", "1", "--gpus-per-node", "3", "--exp", "default", "--out", str(tmp_path / "r"),
                     "--dry-run", "train.batch_size=64"])
    assert rc == 2 and "train.batch_size=64 is not divisible by the 3 process(es)" in capsys.readouterr().err
    # No SLURM client on PATH: one line naming what is missing.
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    rc = slurm.main(["--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--exp", "default",
                     "--out", str(tmp_path / "r2"), "train.steps=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "sbatch" in err and "not on PATH" in err and "Traceback" not in err
