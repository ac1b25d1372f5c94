"""benchmarks/device_check.py: every section at toy sizes on the CPU, so the GPU script does not rot."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from benchmarks import device_check
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.py")


@pytest.mark.slow
def test_tiny_cpu_run_fills_every_section(tmp_path):
    out = tmp_path / "device_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SNGAN_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    secs = report["sections"]
    assert set(secs) == set(device_check.SECTIONS)
    for name, sec in secs.items():
        assert sec["status"] in ("ok", "skipped"), (name, sec)
        assert sec["status"] == "ok" or sec["reason"], name
        assert sec["seconds"] >= 0
    assert secs["host_syncs"] == {**secs["host_syncs"], "status": "skipped", "reason": "CUDA only"}

    env_sec = secs["environment"]
    assert env_sec["cuda"] is None and env_sec["cpu_count"] >= 1 and env_sec["matmul_peak_tflops"]["fp32"] > 0

    sn = secs["spectral_norm"]
    for precision in ("fp32", "bf16", "fp16"):
        ours = sn["ours"][precision]
        assert ours["rel_error"] < 1e-4 and ours["fp32"], ours
        assert set(ours["buffer_dtypes"].values()) == {"float32"} and ours["op_dtypes"]["mv"] == ["float32"]
        assert sn["torch"][precision]["rel_error"] >= 0
    assert sn["ours"]["bf16"]["conv_output_dtype"] == "bfloat16"  # autocast was on around the check

    entries = secs["throughput"]["entries"]
    assert {(e["exp"], e["precision"]) for e in entries} >= {("cifar10_sngan_hinge_resnet", "fp32"),
                                                             ("cifar10_sngan_hinge_resnet", "bf16"),
                                                             ("imagenet128", "bf16")}
    for e in entries:
        assert e["status"] == "ok", e
        assert e["images_per_s"] > 0 and e["flops_per_iter"] > 0 and 0 < e["mfu"] < 1
    assert any(e.get("compile") for e in entries) and any(e["channels_last"] for e in entries)
    ratios = [e["ratio_ours_over_bare"] for e in entries if e.get("loop_vs_bare")]
    assert len(ratios) == 2 and all(0.2 < r < 5 for r in ratios)

    loader = secs["loader"]
    assert loader["webdataset"]["loader_images_per_s"] > 0
    assert 0 <= loader["webdataset"]["wait_in_next_fraction"] <= 1
    assert loader["ffcv"]["status"] in ("ok", "skipped")

    run = secs["real_run"]
    assert run["exit_code"] == 75 and run["steps"] >= 1 and run["train_images_per_s"] > 0
    assert run["fid"]["status"] == "ok" and run["fid"]["fid"] >= 0 and run["fid"]["eval_images_per_s"] > 0

    md = (tmp_path / "device_check.md").read_text()
    assert all(f"| {name} |" in md for name in device_check.SECTIONS) and md.strip() in proc.stdout


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = device_check.main(["--tiny", "--device", "cpu", "--out", str(out), "--data", str(tmp_path / "missing"),
                              "--ref", str(tmp_path / "missing.npz"), "--skip", "throughput", "--skip", "real_run"])
    assert code == 1
    secs = json.loads(out.read_text())["sections"]
    assert secs["loader"]["status"] == "failed" and "missing" in secs["loader"]["error"]
    assert secs["spectral_norm"]["status"] == "ok" and secs["environment"]["status"] == "ok"
    assert secs["throughput"] == {"status": "skipped", "reason": "--skip", "seconds": 0.0}
    assert "| loader | failed |" in capsys.readouterr().out


def _warns_twice():
    for _ in range(2):
        warnings.warn("called a synchronizing CUDA operation")


def test_capture_warnings_names_the_place_in_the_repository():
    syncs = device_check.capture_warnings(_warns_twice)
    assert len(syncs) == 1 and syncs[0]["count"] == 2
    assert syncs[0]["message"] == "called a synchronizing CUDA operation"
    assert syncs[0]["where"].startswith("tests/test_device_check.py:") and syncs[0]["where"].endswith("in _warns_twice")


def test_help_documents_every_option_with_defaults():
    text = device_check.build_parser().format_help()
    for option in ("--out", "--tiny", "--data", "--ffcv", "--ref", "--run-seconds", "--throughput-budget",
                   "--compile-backend", "--skip", "--device"):
        assert option in text
    assert "default: device_check.json" in text and "default: 240" in text
