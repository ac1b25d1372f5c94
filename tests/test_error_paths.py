"""Declared errors become one line and their exit code; a bug keeps its traceback and exits 1.

Each command line maps only the exceptions that declare an exit code (``trainer/errors.py``:
subclasses of ``SnganError``, plus the data and model layers' declared input errors). A bare
``ValueError`` raised by a bug must not look like bad input: it is injected here into the real
trainer and evaluator (a wrapper replaces one function, then runs the real ``main``).
"""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

TRAINER = """
import sys
import trainer.loop as loop
{patch}
from trainer.main import main
sys.exit(main(sys.argv[1:]))
"""

EVALUATOR = """
import sys
import eval.fid as fid
{patch}
from eval.errors import cli
sys.exit(cli(fid.main, sys.argv[1:]))
"""


def run(code: str, *args):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=300)


def train_args(tmp_path):
    return ["--out", str(tmp_path / "run"), *TINY, "train.steps=2"]


def test_exit_codes_and_hierarchy():
    from data_pipelines.errors import DataMissing
    from eval.ckpt import CheckpointError as EvalCheckpointError
    from eval.data import DataError
    from eval.extractors import ExtractorUnavailable
    from eval.generate import NonFiniteSamples
    from eval.statsfile import StatsError
    from launch.compare import Interrupted
    from models.export import GeneratorFileError
    from trainer import errors
    from trainer.checkpoint import CheckpointError, CheckpointWriteError
    from trainer.config import ConfigError
    from trainer.loop import DataMismatch, StorageError, TrainingDiverged
    from trainer.runfolder import ConfigChanged, RunFolderBusy

    assert (errors.EXIT_OK, errors.EXIT_DIVERGED, errors.EXIT_BAD_INPUT, errors.EXIT_STORAGE,
            errors.EXIT_PREEMPTED) == (0, 1, 2, 74, 75)
    for cls in (ConfigError, ConfigChanged, CheckpointError, DataMismatch, RunFolderBusy, EvalCheckpointError,
                DataError, StatsError, NonFiniteSamples, ExtractorUnavailable, errors.UsageError, errors.MissingInput):
        assert issubclass(cls, errors.BadInput) and errors.exit_code_of(cls("x")) == 2, cls
    assert errors.exit_code_of(StorageError("x")) == errors.exit_code_of(CheckpointWriteError("x")) == 74
    assert errors.exit_code_of(Interrupted("x")) == 75
    assert errors.exit_code_of(TrainingDiverged("x")) == 1
    # the layers below declare their own input errors; mapped explicitly
    assert errors.exit_code_of(DataMissing("x")) == errors.exit_code_of(GeneratorFileError("x")) == 2
    # the builtin bases are kept, so existing `except ValueError` / `except RuntimeError` still match
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, RuntimeError)
    assert issubclass(errors.MissingInput, FileNotFoundError) and issubclass(DataMissing, FileNotFoundError)
    # undeclared: a bug
    for exc in (ValueError("x"), FileNotFoundError("x"), KeyError("x"), RuntimeError("x")):
        assert errors.exit_code_of(exc) is None
    assert errors.one_line(ValueError("a\nb")) == "a b"
    assert errors.one_line(ValueError("a\nb"), first_line=True) == "a"
    assert errors.one_line(ValueError("")) == "ValueError"


def test_trainer_declared_error_is_one_line_exit_2(tmp_path):
    patch = ("def run(self):\n    raise loop.DataMismatch('data.resolution=48 does not fit: injected declared error')\n"
             "loop.Loop.run = run")
    proc = run(TRAINER.format(patch=patch), *train_args(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "[trainer] error: data.resolution=48 does not fit: injected declared error"


def test_trainer_data_layer_error_is_exit_2(tmp_path):
    """A real one from the layer below: shards that do not exist (data_pipelines.errors.DataMissing)."""
    proc = run(TRAINER.format(patch=""), *train_args(tmp_path), "data.backend=webdataset",
               f"data.path={tmp_path / 'no-shards'}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "no-shards" in proc.stderr.strip().splitlines()[-1]


def test_trainer_bug_keeps_traceback_exit_1(tmp_path):
    patch = "def run(self):\n    raise ValueError('injected bug')\nloop.Loop.run = run"
    proc = run(TRAINER.format(patch=patch), *train_args(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: injected bug"
    assert "[trainer] error" not in proc.stderr


FID_ARGS = ["synthetic:32:64:0", "synthetic:32:64:1", "--extractor", "tiny-test", "--batch-size", "32"]


def test_evaluator_runs_and_declared_error_is_one_line_exit_2(tmp_path):
    ok = run(EVALUATOR.format(patch=""), *FID_ARGS)
    assert ok.returncode == 0, ok.stderr
    bad = run(EVALUATOR.format(patch=""), str(tmp_path / "nothing-here"), *FID_ARGS[1:])
    assert bad.returncode == 2, bad.stderr
    assert "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "nothing-here" in lines[-1]


def test_evaluator_bug_keeps_traceback_exit_1():
    patch = "def frechet_distance(*a, **k):\n    raise ValueError('injected bug')\nfid.frechet_distance = frechet_distance"
    proc = run(EVALUATOR.format(patch=patch), *FID_ARGS)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: injected bug"
    assert "error: injected bug" not in proc.stderr


def test_cli_maps_only_declared(capsys):
    from eval.errors import cli
    from trainer.errors import UsageError

    def declared(argv):
        raise UsageError("--x must be >= 1")

    def bug(argv):
        raise ValueError("bug")
    assert cli(declared, []) == 2
    assert capsys.readouterr().err == "error: --x must be >= 1\n"
    with pytest.raises(ValueError, match="bug"):
        cli(bug, [])
