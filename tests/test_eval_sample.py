"""eval.sample writes the generator's own samples (PNG folder or .npz), from a generator file, a
checkpoint folder, a run folder or RUN/best; 2 processes write the files of 1; bad input exits 2.
models.export.load_generator resolves run and checkpoint folders."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import models
from eval.generate import balanced_counts, sample_noise, to_uint8
from eval.sample import main as sample_main
from models.export import generator_file, load_generator, save_generator

from eval_helpers import ROOT, TINY_G, export_generator, free_port, make_checkpoint, subprocess_env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder (glob characters in its name) with two complete checkpoints, an incomplete newer
    one, a partial save, and ``best`` -> the older checkpoint (a symlink, as the trainer makes it)."""
    tmp = tmp_path_factory.mktemp("sample")
    run_dir = tmp / "run[a]*"
    old = make_checkpoint(run_dir, 5, seed=1)
    new = make_checkpoint(run_dir, 12, seed=2)
    os.remove(os.path.join(make_checkpoint(run_dir, 20, seed=3), "meta.json"))   # still being written
    os.makedirs(run_dir / "checkpoints" / "ckpt-000000030.partial")
    os.symlink(os.path.join("checkpoints", "ckpt-000000005"), run_dir / "best")
    return tmp, str(run_dir), old, new


def expected_images(path, which, counts, seed, batch_size):
    """to_uint8(G(z, y)) for the plan ``counts`` (class-major), computed in the same batches."""
    G, _ = load_generator(path, which)
    conditional = len(counts) > 1
    cls = [c for c, n in enumerate(counts) for _ in range(n)]
    within = [j for n in counts for j in range(n)]
    out = []
    with torch.no_grad():
        for b in range(0, len(cls), batch_size):
            z = sample_noise(seed, cls[b:b + batch_size], within[b:b + batch_size], G.z_dim)
            y = torch.tensor(cls[b:b + batch_size]) if conditional else None
            out.append(to_uint8(G(z, y)))
    return torch.cat(out).permute(0, 2, 3, 1).numpy(), np.asarray(cls)


def read_folder(folder):
    names = sorted(os.listdir(folder))
    return names, np.stack([np.asarray(Image.open(os.path.join(folder, n))) for n in names])


def test_load_generator_takes_a_run_folder_or_a_checkpoint_folder(run, tmp_path):
    _, run_dir, old, new = run
    new_file = os.path.join(new, "generator.safetensors")
    assert generator_file(run_dir) == new_file            # newest complete checkpoint, not ckpt-20 / .partial
    assert generator_file(new) == new_file
    assert generator_file(os.path.join(run_dir, "best")) == os.path.join(run_dir, "best", "generator.safetensors")
    g_run, meta = load_generator(run_dir, which="G")
    g_file, _ = load_generator(new_file, which="G")
    assert meta["path"] == new_file and meta["which"] == "G"
    for (k, a), (_, b) in zip(g_run.state_dict().items(), g_file.state_dict().items()):
        assert torch.equal(a, b), k
    g_best, _ = load_generator(os.path.join(run_dir, "best"), which="G")
    assert not torch.equal(next(g_best.parameters()), next(g_run.parameters()))   # ckpt-5, another seed
    os.makedirs(tmp_path / "empty_run" / "checkpoints")
    os.makedirs(tmp_path / "plain")
    half = tmp_path / "half"
    os.makedirs(half)
    export_generator(half / "generator.safetensors")
    os.makedirs(tmp_path / "nogen")
    (tmp_path / "nogen" / "meta.json").write_text("{}")
    for path, match in ((tmp_path / "nothing", "does not exist"),
                        (tmp_path / "empty_run", "run folder without a complete checkpoint"),
                        (tmp_path / "plain", "neither generator.safetensors"),
                        (half, "no meta.json.*incomplete checkpoint.*pass the file itself"),
                        (tmp_path / "nogen", "checkpoint folder without generator.safetensors")):
        with pytest.raises(ValueError, match=match):
            load_generator(str(path))
    with pytest.raises(ValueError, match="which='ema'"):
        load_generator(new_file, which="ema")


def test_pngs_are_the_generators_own_samples(run, tmp_path, capsys):
    _, run_dir, _, new = run
    out = tmp_path / "pngs"
    assert sample_main([run_dir, "--num", "23", "--out", str(out), "--batch-size", "10", "--seed", "3",
                        "--no-progress"]) == 0
    assert "wrote 23 images" in capsys.readouterr().out
    counts = balanced_counts(23, 10)                       # 3 3 3 2 2 2 2 2 2 2
    want, cls = expected_images(os.path.join(new, "generator.safetensors"), "G_ema", counts, 3, 10)
    names, got = read_folder(out)
    assert names == [f"{i:06d}_c{c}.png" for i, c in enumerate(cls)]
    assert names[:4] == ["000000_c0.png", "000001_c0.png", "000002_c0.png", "000003_c1.png"]
    assert got.shape == (23, 32, 32, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    assert len({img.tobytes() for img in got}) == 23       # every sample has its own noise
    # --no-ema: the G weights; the same command again rewrites the same names
    assert sample_main([run_dir, "--num", "23", "--out", str(out), "--batch-size", "10", "--seed", "3",
                        "--no-ema", "--no-progress"]) == 0
    want_g, _ = expected_images(os.path.join(new, "generator.safetensors"), "G", counts, 3, 10)
    names2, got2 = read_folder(out)
    assert names2 == names
    np.testing.assert_array_equal(got2, want_g)
    assert not np.array_equal(want_g, want)


def test_npz_holds_arr_0_and_per_class_labels(run, tmp_path):
    tmp, run_dir, old, _ = run
    out = str(tmp_path / "s.npz")
    best = os.path.join(run_dir, "best")
    assert sample_main([best, "--per-class", "4", "--classes", "7,2", "--out", out, "--batch-size", "3",
                        "--no-progress"]) == 0
    with np.load(out) as f:
        assert sorted(f.files) == ["arr_0", "labels"]
        arr, labels = f["arr_0"], f["labels"]
    assert arr.shape == (8, 32, 32, 3) and arr.dtype == np.uint8
    assert labels.tolist() == [2, 2, 2, 2, 7, 7, 7, 7]
    counts = [0] * 10
    counts[2] = counts[7] = 4
    want, _ = expected_images(os.path.join(old, "generator.safetensors"), "G_ema", counts, 0, 3)
    np.testing.assert_array_equal(arr, want)
    # an unconditional generator: no labels; its samples in one block
    uncond = export_generator(tmp_path / "u.safetensors", num_classes=0)
    assert sample_main([uncond, "--num", "5", "--out", str(tmp_path / "u.npz"), "--no-progress"]) == 0
    with np.load(tmp_path / "u.npz") as f:
        assert f.files == ["arr_0"] and f["arr_0"].shape == (5, 32, 32, 3)
        np.testing.assert_array_equal(f["arr_0"], expected_images(uncond, "G_ema", [5], 0, 100)[0])
    # --classes alone spreads --num over those classes (balanced, the first ones get the remainder)
    assert sample_main([best, "--num", "5", "--classes", "1,4", "--out", str(tmp_path / "c.npz"),
                        "--no-progress"]) == 0
    assert np.load(tmp_path / "c.npz")["labels"].tolist() == [1, 1, 1, 4, 4]


def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys):
    _, run_dir, _, new = run
    uncond = export_generator(tmp_path / "u.safetensors", num_classes=0)
    torch.manual_seed(0)
    g = models.build_generator("cnn32", num_classes=0, **TINY_G)
    only_g = str(tmp_path / "g_only.safetensors")
    save_generator(only_g, "cnn32", {"num_classes": 0, **TINY_G}, {"G": g})
    with torch.no_grad():
        for p in g.parameters():
            p.fill_(float("nan"))
    broken = str(tmp_path / "nan.safetensors")
    save_generator(broken, "cnn32", {"num_classes": 0, **TINY_G}, {"G": g})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    Image.new("RGB", (4, 4)).save(foreign / "photo.jpg")
    stale = tmp_path / "stale"
    assert sample_main([uncond, "--num", "6", "--out", str(stale), "--no-progress"]) == 0
    capsys.readouterr()
    out = str(tmp_path / "o")
    cases = [([uncond, "--num", "4", "--classes", "1", "--out", out], "unconditional.*drop --classes"),
             ([uncond, "--per-class", "2", "--out", out], "unconditional.*drop --per-class"),
             ([run_dir, "--num", "4", "--classes", "3,10", "--out", out], r"\[10\] outside.*0\.\.9"),
             ([run_dir, "--num", "4", "--classes", "3,x", "--out", out], "comma-separated class indices"),
             ([run_dir, "--num", "4", "--classes", "3,3", "--out", out], "more than once"),
             ([run_dir, "--out", out], "--num N is required"),
             ([run_dir, "--num", "0", "--out", out], "--num 0: must be at least 1"),
             ([run_dir, "--num", "5", "--per-class", "2", "--out", out], "contradicts --per-class 2 x 10"),
             ([uncond, "--num", "4", "--batch-size", "0", "--out", out], "--batch-size 0"),
             ([only_g, "--num", "4", "--ema", "--out", out], "no 'G_ema' weights"),
             ([str(tmp_path / "missing"), "--num", "4", "--out", out], "does not exist"),
             ([broken, "--num", "4", "--out", out], "non-finite pixels"),
             ([uncond, "--num", "4", "--out", str(foreign)], "1 image file.*not written by eval.sample.*photo.jpg"),
             ([uncond, "--num", "4", "--out", str(stale)], "2 sample file.*000004.png.*--overwrite")]
    for argv, match in cases:
        assert sample_main(argv + ["--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert re.search(match, err), (match, err)
    assert os.listdir(out) == [] and sorted(os.listdir(foreign)) == ["photo.jpg"]   # no image written
    # --overwrite deletes our stale samples (only those) and writes the new set
    assert sample_main([uncond, "--num", "4", "--out", str(stale), "--overwrite", "--no-progress"]) == 0
    assert sorted(os.listdir(stale)) == [f"{i:06d}.png" for i in range(4)]
    # the real command line: exit status 2, and --help with the defaults
    proc = subprocess.run([sys.executable, "-m", "eval.sample", uncond, "--num", "2", "--classes", "1", "--out", out],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=subprocess_env())
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --classes 1"), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "eval.sample", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=subprocess_env())
    for flag in ("--num", "--classes", "--per-class", "--seed", "--ema", "--no-ema", "--batch-size", "--device"):
        assert flag in proc.stdout, flag
    assert "(default: 100)" in proc.stdout and "(default: auto)" in proc.stdout


def launch(cmd, timeout=300):
    """Run a launcher command; once more on a fresh port if the free port was taken meanwhile."""
    for _attempt in range(2):
        proc = subprocess.run(cmd(free_port()), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=subprocess_env())
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_ranks_take_disjoint_runs_of_whole_batches():
    from eval.generate import Plan
    from eval.sample import batch_runs
    plan = Plan(balanced_counts(25, 10), True)
    assert [batch_runs(plan, 4, r, 2) for r in range(2)] == [(0, 12), (12, 25)]   # 3 + 4 batches of 4
    for world in range(1, 9):   # every sample exactly once, every cut on a batch boundary
        runs = [batch_runs(plan, 4, r, world) for r in range(world)]
        assert runs[0][0] == 0 and runs[-1][1] == 25
        assert all(a[1] == b[0] and (a[1] % 4 == 0 or a[1] == 25) for a, b in zip(runs, runs[1:]))


@pytest.mark.slow
def test_two_processes_write_the_files_of_one(run, tmp_path):
    _, run_dir, _, _ = run
    # 25 images in batches of 4: 7 batches, rank 0 takes 3 and rank 1 takes 4
    # --num-samples: torchrun's own parser would take --num as an abbreviation of its --numa-binding
    args = [run_dir, "--num-samples", "25", "--batch-size", "4", "--seed", "1", "--no-progress"]
    one = tmp_path / "one"
    assert sample_main(args + ["--out", str(one)]) == 0
    assert sample_main(args + ["--out", str(tmp_path / "one.npz")]) == 0
    two = tmp_path / "two"
    proc = launch(lambda port: ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), "-m", "eval.sample",
                                *args, "--out", str(two)])
    assert proc.stdout.count("wrote 25 images") == 1 and "2 process(es)" in proc.stdout
    assert sorted(os.listdir(two)) == sorted(os.listdir(one)) and len(os.listdir(one)) == 25
    for name in os.listdir(one):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    launch(lambda port: ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), "-m", "eval.sample",
                         *args, "--out", str(tmp_path / "two.npz")])
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_array_equal(a["arr_0"], read_folder(one)[1])
