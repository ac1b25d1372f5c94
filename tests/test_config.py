"""Config: experiments load, overrides are typed, bad keys and values are named."""

import subprocess
import sys

import pytest

from trainer.config import ConfigError, available_experiments, load_config


def test_defaults_and_overrides():
    cfg = load_config("default", ["train.batch_size=16", "optim.lr_d=1e-3", "model.d_constraint=gp",
                                  "train.channels_last=true"])
    assert cfg.train.batch_size == 16 and isinstance(cfg.train.batch_size, int)
    assert cfg.optim.lr_d == pytest.approx(1e-3)
    assert cfg.model.d_constraint == "gp"
    assert cfg.train.channels_last is True
    assert cfg.exp == "default"


def test_int_is_accepted_for_float():
    assert load_config("default", ["optim.lr_g=1"]).optim.lr_g == 1.0


@pytest.mark.parametrize("override, words", [
    ("train.batchsize=3", ["train.batchsize", "train.batch_size"]),
    ("trian.steps=3", ["trian.steps", "train.steps"]),
    ("train.steps=abc", ["train.steps", "int", "abc"]),
    ("train.precision=fp8", ["train.precision", "bf16", "fp8"]),
    ("model.d_constraint=spectral", ["model.d_constraint", "sn", "spectral"]),
    ("train.steps", ["key=value"]),
    ("train.steps=0", ["train.steps", ">= 1"]),
    ("train.resume=/no/such/dir", ["train.resume", "/no/such/dir"]),
])
def test_bad_overrides_name_the_problem(override, words):
    with pytest.raises(ConfigError) as info:
        load_config("default", [override])
    for w in words:
        assert w in str(info.value)


def test_unknown_experiment_lists_valid_ones():
    with pytest.raises(ConfigError, match="cifar10_sngan_hinge_resnet"):
        load_config("cifar10_sngan_hinge_resnett")


@pytest.mark.parametrize("name", available_experiments())
def test_every_experiment_resolves(name):
    cfg = load_config(name)
    assert cfg.train.steps >= 1 and cfg.train.batch_size >= 1
    import models
    assert cfg.model.g in models.generator_names() and cfg.model.d in models.discriminator_names()


def test_base_inheritance(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: default\ntrain:\n  steps: 7\n")
    cfg = load_config(str(child))
    assert cfg.train.steps == 7
    assert cfg.model.num_classes == load_config("default").model.num_classes
    assert cfg.exp == "child"


def test_cli_dry_run_and_bad_key():
    out = subprocess.run([sys.executable, "trainer/main.py", "--dry-run", "train.steps=5"],
                         capture_output=True, text=True, check=True).stdout
    assert "steps: 5" in out
    bad = subprocess.run([sys.executable, "trainer/main.py", "train.stepz=5"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "train.stepz" in bad.stderr and "train.steps" in bad.stderr
