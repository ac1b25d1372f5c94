"""Analysis tools: D spectra, nearest neighbours, sample grids, the comparison table.

Checkpoints are written with the trainer's own checkpoint writer from freshly built tiny models
(no training), so these tests take seconds; the comparison test trains every row for one step.
"""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

import models
from eval.analysis import grids, neighbors, spectra
from eval.data import open_source
from eval.analysis.discriminator import load_discriminator
from models.export import save_generator

from conftest import ROOT, TINY
from eval_helpers import free_port


def make_run(run_dir, *overrides, step=3):
    """RUN_DIR/checkpoints/ckpt-<step>/ written by trainer.checkpoint.save for a fresh tiny model."""
    from trainer import checkpoint
    from trainer.build import build_parts
    from trainer.config import dump, load_config, to_dict
    cfg = load_config("default", [*TINY, *overrides])
    parts = build_parts(cfg, torch.device("cpu"))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        fh.write(dump(cfg))
    export = lambda path: save_generator(path, cfg.model.g, parts.g_kwargs, {"G": parts.G})  # noqa: E731
    meta = {"images_seen": 0, "model": to_dict(cfg)["model"], "exp": cfg.exp}
    checkpoint.save(os.path.join(run_dir, "checkpoints"), step, {"G": parts.G.state_dict(), "D": parts.D.state_dict()},
                    {}, meta, export, keep=3)
    return str(run_dir), parts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    return {name: make_run(tmp / name, *ov) for name, ov in {
        # SN with u warmed up at init: after 3 steps the official (cold) u has not converged yet.
        "sn": ["model.sn_warmup=15"], "wn": ["model.d_constraint=wn"],
        "orth": ["model.d_constraint=orth", "model.num_classes=0"]}.items()}


def known_matrix(s, rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    return u[:, :len(s)] @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v[:, :len(s)].t()


# ----------------------------------------------------------------------------- spectra

def test_spectrum_of_known_singular_values_is_exact():
    s = [4.0, 2.0, 1.0, 0.5]
    layer = nn.Linear(6, 4).double()
    conv = nn.Conv2d(2, 4, 2).double()
    with torch.no_grad():
        layer.weight.copy_(known_matrix(s, 4, 6))
        conv.weight.copy_(known_matrix(s, 4, 8, seed=1).view(4, 2, 2, 2))
    expected = [x / 4 for x in s]
    erank = math.exp(-sum(x / sum(s) * math.log(x / sum(s)) for x in s))  # Roy & Vetterli 2007
    for module in (layer, conv):
        (out,) = spectra.layer_spectra(nn.Sequential(module))
        assert out["sigma_max"] == pytest.approx(4.0, abs=1e-12)
        assert out["normalized"] == pytest.approx(expected, abs=1e-12)
        assert out["effective_rank"] == pytest.approx(erank, abs=1e-12)
        assert out["stable_rank"] == pytest.approx(sum(x * x for x in s) / 16, abs=1e-12)
    # Under SN the effective weight is W / sigma: the same shape of spectrum, top value ~1.
    sn = models.spectral_norm(layer.float(), warmup_iterations=40).eval()
    (out,) = spectra.layer_spectra(nn.Sequential(sn))
    assert out["sigma_max"] == pytest.approx(1.0, abs=1e-5)
    assert out["normalized"] == pytest.approx(expected, abs=1e-5)


def test_lipschitz_bound_is_the_product_over_the_path_without_the_embedding():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Embedding(5, 3))
    with torch.no_grad():
        net[0].weight.copy_(known_matrix([3.0, 1.0, 1.0], 3, 3))
        net[1].weight.copy_(known_matrix([0.5, 0.5, 0.1], 3, 3, seed=2))
        net[2].weight.copy_(known_matrix([7.0, 1.0, 1.0], 5, 3, seed=3))
    out = spectra.model_spectra(net)
    assert out["lipschitz_bound"] == pytest.approx(1.5, rel=1e-6)
    assert [x["in_lipschitz_path"] for x in out["layers"]] == [True, True, False]


def test_spectra_cli_on_runs_of_three_constraints(runs, tmp_path):
    paths = [runs[k][0] for k in ("sn", "wn", "orth")]
    assert spectra.main([*paths, "--out", str(tmp_path), "--labels", "SN,WN,orth"]) == 0
    data = json.loads((tmp_path / "spectra.json").read_text())
    assert [r["label"] for r in data] == ["SN", "WN", "orth"]
    assert [r["d_constraint"] for r in data] == ["sn", "wn", "orth"]
    assert (tmp_path / "spectra.png").stat().st_size > 1000
    # SN: every layer's effective weight has sigma_max ~ 1 (model.sn_warmup: u warmed up at init).
    assert all(x["sigma_max"] == pytest.approx(1.0, abs=0.05) for x in data[0]["layers"])
    # The loaded D is the trained one: its layers equal the checkpoint's.
    D, info = load_discriminator(runs["wn"][0])
    assert info["d_constraint"] == "wn" and info["step"] == 3
    ref = runs["wn"][1].D.eval()
    for (name, a), (_, b) in zip(spectra.weight_layers(D), spectra.weight_layers(ref)):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0, msg=name)


def test_spectra_cli_rejects_bad_inputs(runs, tmp_path, capsys):
    assert spectra.main([str(tmp_path / "missing")]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err
    gen = os.path.join(runs["sn"][0], "checkpoints", "ckpt-000000003", "generator.safetensors")
    assert spectra.main([gen]) == 2
    assert "only in a training checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        spectra.main([runs["sn"][0], "--labels", "a,b"])


# ----------------------------------------------------------------------------- neighbours

def test_topk_streaming_equals_a_full_sort():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(3, 50, generator=g)
    top = neighbors.TopK(3, 4)
    for i in range(0, 50, 7):
        idx = torch.arange(i, min(i + 7, 50))
        top.update(d[:, i:i + 7], {"index": idx, "label": idx % 5})
    vals, idx = d.topk(4, dim=1, largest=False)
    torch.testing.assert_close(top.dist, vals)
    assert torch.equal(top.extra["index"], idx) and torch.equal(top.extra["label"], idx % 5)


@pytest.mark.parametrize("name", ["sn", "orth"])  # projection D (10 classes) and unconditional D
def test_a_data_image_is_its_own_nearest_neighbour_in_both_spaces(runs, name):
    D, _ = load_discriminator(runs[name][0])
    source = open_source("synthetic:32:300")
    picks = [3, 150, 299]
    queries = neighbors._data_queries(source, picks)
    res = neighbors.search(queries, source, D, k=3, batch_size=64)
    assert res["images"] == 300
    for space in ("phi", "pixel"):
        top = res["spaces"][space]
        assert top.extra["index"][:, 0].tolist() == picks, space
        assert (top.dist[:, 0] <= 1e-5 * top.dist[:, 1]).all(), (space, top.dist)
        assert torch.equal(top.extra["image"][:, 0], queries)
    assert (res["spaces"]["pixel"].dist[:, 0] == 0).all()


def test_neighbors_cli_generated_queries(runs, tmp_path, capsys):
    out = tmp_path / "nn"
    assert neighbors.main(["--ckpt", runs["sn"][0], "--data", "synthetic:32:200", "--out", str(out), "--k", "3",
                           "--num-queries", "4", "--batch-size", "64", "--scale", "2"]) == 0
    rec = json.loads((out / "neighbors.json").read_text())
    assert rec["images"] == 200 and rec["images_per_s"] > 0 and rec["query_classes"] == [0, 1, 2, 3]
    for space in ("phi", "pixel"):
        assert len(rec["spaces"][space]["index"]) == 4 and len(rec["spaces"][space]["index"][0]) == 3
        d = rec["spaces"][space]["distance"]
        assert all(row == sorted(row) for row in d)
        assert (out / f"neighbors_{space}.png").is_file()
    assert "images/s" in capsys.readouterr().out
    bad = ["--ckpt", runs["sn"][0], "--out", str(out)]
    assert neighbors.main([*bad, "--data", "synthetic:32:50", "--spaces", "phi,colour"]) == 2
    assert neighbors.main([*bad, "--data", "synthetic:16:50"]) == 2
    assert "pass --resolution 32" in capsys.readouterr().err


def write_shards(folder, n=150, per_shard=50):
    """WebDataset tars in the data_pipelines.prepare layout (KEY.img.jpg + KEY.cls)."""
    import io
    import tarfile
    from PIL import Image
    from data_pipelines.synthetic import render
    images, labels = render(range(n), 32, 0)
    os.makedirs(folder, exist_ok=True)
    for k in range(0, n, per_shard):
        path = os.path.join(folder, f"shard-{k // per_shard:06d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(k, min(k + per_shard, n)):
                buf = io.BytesIO()
                Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
                members = ((f"{i:05d}.img.jpg", buf.getvalue()), (f"{i:05d}.cls", str(int(labels[i])).encode()))
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder)


@pytest.mark.slow
def test_two_process_search_over_shards_equals_one_process(runs, tmp_path):
    shards = write_shards(tmp_path / "shards")
    common = ["--ckpt", runs["sn"][0], "--data", shards, "--k", "4", "--query-indices", "5,77,149",
              "--batch-size", "16"]
    assert neighbors.main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           os.path.join(ROOT, "eval", "neighbors.py"), *common, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("images/s") == 1  # rank 0 reports
    one, two = (json.loads((tmp_path / d / "neighbors.json").read_text()) for d in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["images"] == two["images"] == 150
    for space in ("phi", "pixel"):
        a, b = one["spaces"][space], two["spaces"][space]
        assert a["index"] == b["index"] and [r[0] for r in a["index"]] == [5, 77, 149]
        torch.testing.assert_close(torch.tensor(b["distance"]), torch.tensor(a["distance"]), rtol=1e-5, atol=1e-5)
        assert all(r[0] <= 1e-5 * r[1] for r in b["distance"])


# ----------------------------------------------------------------------------- grids

def test_morph_and_interpolation_endpoints_are_the_plain_samples(runs):
    G = copy.deepcopy(runs["sn"][1].G).eval()
    with torch.no_grad():  # fresh class embeddings are all equal (gain 1, bias 0): make classes differ
        for m in G.modules():
            if isinstance(m, models.ConditionalBatchNorm2d):
                m.gamma.weight.normal_(1.0, 0.5)
                m.beta.weight.normal_(0.0, 0.5)
    z = grids._noise(0, 2, G.z_dim, 3)
    a, b = 2, 7
    steps = 5
    x = grids.morph(G, a, b, rows=2, steps=steps, seed=0).view(2, steps, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(x[:, 0], G(z, torch.full((2,), a)))
        torch.testing.assert_close(x[:, -1], G(z, torch.full((2,), b)))
    assert not torch.allclose(x[:, 2], x[:, 0])
    y = grids.interpolation(G, rows=2, steps=steps, seed=0, classes=[4]).view(2, steps, 3, 32, 32)
    z0, z1 = grids._noise(0, 2, G.z_dim, 1), grids._noise(0, 2, G.z_dim, 2)
    with torch.no_grad():
        torch.testing.assert_close(y[:, 0], G(z0, torch.full((2,), 4)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y[:, -1], G(z1, torch.full((2,), 4)), atol=1e-5, rtol=1e-5)
    # The hooks are removed afterwards: G is conditional again.
    with torch.no_grad():
        torch.testing.assert_close(G(z, torch.full((2,), a)), x[:, 0])


def test_grids_cli(runs, tmp_path, capsys):
    out = tmp_path / "g"
    assert grids.main([runs["sn"][0], "--out", str(out), "--rows", "2", "--steps", "4", "--cols", "3"]) == 0
    assert sorted(os.listdir(out)) == ["classes.png", "interp.png", "morph.png"]
    from PIL import Image
    assert Image.open(out / "classes.png").size == (3 * 33 + 1, 10 * 33 + 1)  # 10 class rows of 3
    gen = os.path.join(runs["orth"][0], "checkpoints", "ckpt-000000003", "generator.safetensors")
    assert grids.main([gen, "--out", str(out / "u"), "--kind", "morph"]) == 2
    assert "needs a class-conditional generator" in capsys.readouterr().err
    assert grids.main([gen, "--out", str(out / "u"), "--rows", "2", "--cols", "2"]) == 0  # morph skipped
    assert sorted(os.listdir(out / "u")) == ["classes.png", "interp.png"]
    assert grids.main([runs["sn"][0], "--classes", "3,11"]) == 2
    assert "outside [0, 10)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- help, compare

@pytest.mark.parametrize("module", ["spectra", "neighbors", "grids", "compare"])
def test_help_shows_defaults(module):
    proc = subprocess.run([sys.executable, "-m", f"eval.{module}", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "(default:" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_compare_quick_mode_table_has_every_row(tmp_path, capsys):
    from launch import compare
    args = ["--suite", "paper", "--quick", "--steps", "1", "--num-samples", "32", "--batch-size", "4",
            "--width", "4", "--extractor", "tiny-test", "--out", str(tmp_path), "--jobs", "1"]  # in this process
    threads = torch.get_num_threads()
    assert compare.main(args) == 0
    assert torch.get_num_threads() == threads  # --threads (quick: 1) is undone afterwards
    table = (tmp_path / "compare.md").read_text()
    for row in compare.SUITES["paper"]:
        assert f"| {row.name} | `{row.exp}` |" in table
    assert "real data (held-out N)" in table and "Works = training finished" in table
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert len(rows) == 7 and all(r["exit"] == 0 and math.isfinite(r["fid"]) for r in rows)
    assert all(r["verdict"].startswith(("works", "does not work")) for r in rows)
    # A rerun reuses the finished runs instead of training again.
    assert compare.main(args) == 0
    assert capsys.readouterr().out.count("reusing") == 7
    assert compare.main([*args, "--rows", "cifar10_nope"]) == 2
    # Trailing overrides reach every row's trainer; a folder trained with other values is refused.
    assert compare.main([*args, "train.seed=3"]) == 2
    err = capsys.readouterr().err
    assert "was trained with another config (train.seed: 0 -> 3)" in err
    # A row trained by an older sngan (its config.yaml lacks keys added since) is still reused.
    old_cfg = tmp_path / "cifar10_dcgan" / "config.yaml"
    cfg = yaml.safe_load(old_cfg.read_text())
    del cfg["train"]["tf32"], cfg["optim"]["implementation"]
    old_cfg.write_text(yaml.safe_dump(cfg))
    assert compare.main([*args, "--rows", "cifar10_dcgan"]) == 0
    assert "DCGAN: reusing" in capsys.readouterr().out
    # ... but not one trained before the official computation became the default: a config.yaml
    # without optim.adam was trained with torch's Adam, and the change is named, not continued.
    cfg = yaml.safe_load(old_cfg.read_text())
    del cfg["optim"]["adam"]
    old_cfg.write_text(yaml.safe_dump(cfg))
    assert compare.main([*args, "--rows", "cifar10_dcgan"]) == 2
    assert "optim.adam: 'torch' -> 'chainer'" in capsys.readouterr().err
    other = [a if a != str(tmp_path) else str(tmp_path / "seed3") for a in args]
    assert compare.main([*other, "--rows", "cifar10_dcgan", "train.seed=3", "train.n_dis=2"]) == 0
    cfg = yaml.safe_load((tmp_path / "seed3" / "cifar10_dcgan" / "config.yaml").read_text())
    assert cfg["train"]["seed"] == 3 and cfg["train"]["n_dis"] == 2
    assert "Every row trained with `train.seed=3`, `train.n_dis=2`." in (tmp_path / "seed3" / "compare.md").read_text()
    assert compare.main([*other, "train.sed=3"]) == 2
    assert "did you mean train.seed" in capsys.readouterr().err


def test_compare_jobs_trains_rows_in_parallel_processes_and_forwards_sigterm(tmp_path):
    """--jobs 2: rows train as separate trainer processes at once; SIGTERM reaches them, each writes a
    checkpoint and the comparison exits 75; the same command with a smaller budget reuses them."""
    import signal
    import time
    out = tmp_path / "cmp"
    base = [sys.executable, "-m", "eval.compare", "--suite", "paper", "--quick", "--num-samples", "32",
            "--batch-size", "4", "--width", "4", "--extractor", "tiny-test", "--out", str(out), "--jobs", "2",
            "--rows", "cifar10_dcgan,cifar10_sngan_w_cnn,cifar10_sngan_hinge_resnet"]
    proc = subprocess.Popen([*base, "--steps", "100000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        logs = [out / exp / "train.log" for exp in ("cifar10_dcgan", "cifar10_sngan_w_cnn")]
        deadline = time.time() + 120
        # Both trainers have their stop handlers (installed before this line is printed); a signal any
        # time after it is answered with a checkpoint after the current step.
        while not all(p.is_file() and "run folder" in p.read_text() for p in logs):
            assert proc.poll() is None and time.time() < deadline, "compare exited early or timed out"
            time.sleep(0.5)
        assert not (out / "cifar10_sngan_hinge_resnet" / "train.log").exists()  # the third waits for a slot
    finally:  # whatever failed above, the comparison and its trainers stop (SIGTERM is forwarded)
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, text
    assert "cifar10_dcgan" in text and "cifar10_sngan_w_cnn" in text and "run the same command again" in text
    for exp in ("cifar10_dcgan", "cifar10_sngan_w_cnn"):
        ckpts = sorted((out / exp / "checkpoints").glob("ckpt-*"))
        assert ckpts and (ckpts[-1] / "meta.json").is_file(), exp
    # A smaller budget counts the signal checkpoints as finished; only the third row trains.
    done = subprocess.run([*base, "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("reusing") == 2 and "training SN-GAN, hinge, ResNet" in done.stdout
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["exp"] for r in rows] == ["cifar10_dcgan", "cifar10_sngan_w_cnn", "cifar10_sngan_hinge_resnet"]
    assert all(r["exit"] == 0 and math.isfinite(r["fid"]) for r in rows)


def test_conv_operator_norm_is_exact_for_known_convs():
    """A 1x1 conv is its matrix (operator norm = sigma of the reshaped kernel); a 3x3 all-ones kernel
    with zero padding on n x n is T (x) T with T tridiagonal of ones: norm (1 + 2 cos(pi/(n+1)))^2,
    while the reshaped kernel's sigma is only 3."""
    from eval.analysis.spectra import conv_operator_norms
    torch.manual_seed(0)
    one = nn.Conv2d(4, 6, 1, bias=False)
    three = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        three.weight.fill_(1.0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), one, nn.Conv2d(6, 1, 1, bias=False), three)
    norms = conv_operator_norms(model, resolution=16, iters=300)
    assert norms["1"] == pytest.approx(torch.linalg.matrix_norm(one.weight.double().view(6, 4), 2).item(), rel=1e-6)
    assert norms["3"] == pytest.approx((1 + 2 * math.cos(math.pi / 17)) ** 2, rel=1e-6)
    assert torch.linalg.matrix_norm(three.weight.double().view(1, 9), 2).item() == pytest.approx(3.0)
    model.resolution = 16  # without an explicit size, the model's own resolution is used (as D's is)
    assert conv_operator_norms(model, iters=300) == pytest.approx(norms)
