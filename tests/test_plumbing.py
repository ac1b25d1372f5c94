"""Shared plumbing and named structures: one rank module, bounds beside the config fields, the
evaluator's process-wide TF32 settings restored, the loader's batches and Loop state named."""

import dataclasses
import pickle

import numpy as np
import pytest
import torch


def test_one_rank_module_serves_trainer_and_evaluator():
    import os

    import trainer.dist as dist
    assert not os.path.exists(os.path.join(os.path.dirname(dist.__file__), "..", "eval", "dist.py"))
    # exact, disjoint slices covering every index once (sizes differ by at most one)
    parts = [dist.exact_slice(10, r, 3) for r in range(3)]
    assert parts == [(0, 3), (3, 6), (6, 10)]
    assert dist.gather_rows(torch.ones(2, 3), [2]).shape == (2, 3)      # one process: unchanged
    assert dist.all_gather_counts(5, torch.device("cpu")) == [5]


def test_config_bounds_are_declared_beside_the_fields():
    from data_pipelines.config import DataConfig
    from trainer import config
    from trainer.config import Config, ConfigError, load_config
    declared = config._declared()
    # every bounded key's bounds come from its field's metadata; nothing is kept elsewhere
    assert set(config.MIN_INT) | set(config.FLOAT_RANGES) | set(config.CHOICES) == set(declared)
    fields = {f.name: f for f in dataclasses.fields(config.TrainConfig)}
    assert fields["batch_size"].metadata["low"] == 1 and fields["batch_size"].metadata["high"] == 1 << 20
    assert dict(dataclasses.fields(DataConfig)[2].metadata) == {"low": 1, "high": 4096}   # data.resolution
    assert config.CHOICES["train.update_order"] == ("g_first", "d_first")
    assert config.FLOAT_RANGES["model.bn_eps"] == (0.0, True, 1.0, False)
    assert Config().train.batch_size == 64 and Config().model.d_constraint == "sn"   # defaults unchanged
    for override, message in [("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
                              ("model.ch=100000", "model.ch=100000 is larger than 16384; a typo?"),
                              ("optim.beta1=1.0", "optim.beta1 must be < 1, got 1"),
                              ("model.bn_eps=0", "model.bn_eps must be > 0, got 0"),
                              ("data.pixel_scale=200", "data.pixel_scale must be <= 128, got 200"),
                              ("model.z_dist=gauss", "config key 'model.z_dist' must be one of normal, uniform; "
                                                     "got 'gauss'")]:
        with pytest.raises(ConfigError) as err:
            load_config("default", [override])
        assert str(err.value) == message


def test_config_has_no_import_cycle_with_build():
    import ast
    import inspect

    from trainer import build, config
    tree = ast.parse(inspect.getsource(config))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "build" not in imported and "trainer.build" not in imported
    assert build.generator_kwargs is config.generator_kwargs      # still importable from trainer.build


@pytest.mark.parametrize("before", [(True, True), (False, True), (True, False)])
def test_evaluator_restores_tf32_settings(before):
    from eval.main import no_tf32
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
        with no_tf32(torch.device("cuda")):   # flags only: no GPU needed to set them
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
        with pytest.raises(RuntimeError):     # restored when the evaluation fails, too
            with no_tf32(torch.device("cuda")):
                raise RuntimeError("x")
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
        with no_tf32(torch.device("cpu")):    # nothing changes on CPU
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_worker_batch_is_named_and_crosses_processes():
    from data_pipelines.wds_loader import ShardStream, WorkerBatch
    b = WorkerBatch(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), np.array([1, 2]), 0, ring_index=3)
    again = pickle.loads(pickle.dumps(b))
    assert again.ring_index == 3 and again.keys is None and again.labels.tolist() == [1, 2]
    assert "_readable" not in ShardStream.__init__.__code__.co_names


def test_loop_state_is_created_in_init():
    import ast
    import inspect

    from trainer.loop import Loop
    tree = ast.parse(inspect.getsource(Loop))
    init, elsewhere = set(), set()
    for fn in (n for n in tree.body[0].body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(fn):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                for e in ast.walk(t):
                    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                        (init if fn.name == "__init__" else elsewhere).add(e.attr)
    assert elsewhere - init == set()
    assert {"_start_batch", "_data_seed", "status"} <= init
