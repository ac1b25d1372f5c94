"""python -m eval.fid with the inputs and options pytorch-fid / torch-fidelity users pass: folders,
stats files (ours and plain mu/sigma), --save-stats, --device, --batch-size, --num-workers."""

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines.synthetic import render
from eval import fid as fid_cli
from eval.statsfile import load_stats

from eval_helpers import ROOT, subprocess_env

TINY = ["--extractor", "tiny-test"]


def fid_of(capsys):
    out = capsys.readouterr().out
    return float(out.split("FID:")[1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """60 PNGs of the embedded data, flat (as sample dumps are), plus one file that is not an image."""
    root = tmp_path_factory.mktemp("fidcli") / "images"
    root.mkdir()
    images, _ = render(range(60), 32, 0)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / f"{i:06d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)   # a PNG header, then nothing
    return root


def test_save_stats_loads_with_numpy_and_gives_fid_0_against_its_folder(folder, tmp_path, capsys):
    stats = str(tmp_path / "a.npz")
    # like pytorch-fid's --save-stats: one input, statistics only
    assert fid_cli.main([str(folder), "--save-stats", stats, *TINY, "--num-workers", "0", "--batch-size", "7"]) == 0
    captured = capsys.readouterr()
    assert "FID:" not in captured.out and f"saved the statistics of {folder} to {stats}" in captured.out
    # the undecodable file is skipped, counted and named
    assert "skipped 1 image(s)" in captured.err and "broken.png" in captured.err
    with np.load(stats) as f:
        assert {"mu", "sigma"} <= set(f.files)
        mu, sigma = f["mu"], f["sigma"]
        assert mu.shape == (16,) and sigma.shape == (16, 16) and mu.dtype == sigma.dtype == np.float64
        assert int(f["n"]) == 60 and str(f["extractor"]) == "tiny-test/v1"
    assert np.allclose(sigma, sigma.T) and np.linalg.eigvalsh(sigma).min() > -1e-9 and np.trace(sigma) > 0
    # the saved statistics against the same folder (read again, with the --workers alias): FID 0
    assert fid_cli.main([stats, str(folder), *TINY, "--workers", "0"]) == 0
    assert fid_of(capsys) == pytest.approx(0.0, abs=1e-6)
    # pytorch-fid's own stats files hold only mu and sigma
    plain = str(tmp_path / "pytorch_fid.npz")
    np.savez(plain, mu=mu, sigma=sigma)
    assert fid_cli.main([str(folder), plain, *TINY, "--num-workers", "0"]) == 0
    assert fid_of(capsys) == pytest.approx(0.0, abs=1e-6)
    # A, B and --save-stats: the FID and A's statistics; another image set gives a positive FID
    other = tmp_path / "other"
    other.mkdir()
    for i, img in enumerate(render(range(1000, 1040), 32, 0)[0]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(other / f"{i:06d}.png")
    stats_b = str(tmp_path / "b.npz")
    assert fid_cli.main([str(other), str(folder), "--save-stats", stats_b, *TINY, "--num-workers", "0"]) == 0
    fid = fid_of(capsys)
    assert fid > 1e-3 and load_stats(stats_b).n == 40
    assert fid_cli.main([stats_b, stats]) == 0                    # two stats files: the same number
    assert fid_of(capsys) == pytest.approx(fid, rel=1e-9)


def test_options_appear_in_help_with_their_defaults():
    text = " ".join(fid_cli.build_parser().format_help().split()).split("options:", 1)[1]   # past the usage
    for option, default in (("--save-stats OUT.npz", "None"), ("--device {auto,cpu,cuda}", "auto"),
                            ("--batch-size B", "100"), ("--num-workers N, --workers N", "2"),
                            ("--num-images N", "0"), ("--extractor", "inception")):
        assert option in text, option
        after = text.split(option, 1)[1]
        assert f"(default: {default})" in after.split(" --")[0], (option, after[:200])


def test_bad_input_exits_2_with_one_line(folder, tmp_path, capsys):
    stats = str(tmp_path / "s.npz")
    assert fid_cli.main([str(folder), "--save-stats", stats, *TINY, "--num-workers", "0"]) == 0
    capsys.readouterr()
    cases = [([str(folder), *TINY], "only one input.*give B.*--save-stats OUT.npz"),
             ([str(folder), "--save-stats", str(tmp_path / "out"), *TINY], "--save-stats .*ending in .npz"),
             ([stats, "--save-stats", str(tmp_path / "again.npz"), *TINY], "already a statistics file"),
             ([str(folder), stats, "--batch-size", "0", *TINY], "--batch-size 0: must be at least 1"),
             ([str(folder), stats, "--num-workers", "-1", *TINY], "--num-workers -1: must be at least 0"),
             ([str(tmp_path / "missing"), stats, *TINY], "missing")]
    import torch
    if not torch.cuda.is_available():
        cases.append(([stats, stats, "--device", "cuda"], "--device cuda: no CUDA device"))
    for argv, match in cases:
        assert fid_cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and re.search(match, err), (match, err)


def test_command_line_on_cpu(folder, tmp_path):
    stats = str(tmp_path / "cpu.npz")
    proc = subprocess.run([sys.executable, "-m", "eval.fid", str(folder), str(folder), "--device", "cpu",
                           "--save-stats", stats, *TINY, "--num-workers", "0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split("FID:")[1]) == pytest.approx(0.0, abs=1e-6)
    assert load_stats(stats).n == 60
