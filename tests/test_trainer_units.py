"""Trainer pieces: LR schedule, EMA, stats collector, mixed precision runs."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import TINY
from trainer.build import lr_factor
from trainer.config import load_config
from trainer.ema import EMA
from trainer.stats import Collector


def test_linear_decay_schedule():
    cfg = load_config("imagenet128")  # 450K steps, decay from 400K
    assert lr_factor(cfg, 0) == 1.0 and lr_factor(cfg, 400_000) == 1.0
    assert lr_factor(cfg, 425_000) == pytest.approx(0.5)
    assert lr_factor(cfg, 450_000) == 0.0
    assert lr_factor(load_config("default"), 10_000) == 1.0


def test_ema_half_life_is_in_images():
    ema = EMA(half_life_images=1000)
    # Whatever the batch, after 1000 images the old weights weigh one half.
    for batch in (10, 50, 250):
        assert ema.beta(batch) ** (1000 // batch) == pytest.approx(0.5)
    a, b = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        a.weight.fill_(0.0)
        b.weight.fill_(1.0)
        b.running_mean.fill_(3.0)
    ema.update(a, b, images_per_step=1000)
    assert torch.allclose(a.weight, torch.full((2,), 0.5))
    assert torch.equal(a.running_mean, b.running_mean)  # buffers copied, not averaged


def test_collector_means_per_tick():
    c = Collector(torch.device("cpu"))
    for v in (1.0, 2.0, 6.0):
        c.report("x", torch.tensor([v, v]))
    c.report("y", 5)
    assert c.reduce() == {"x": 3.0, "y": 5.0}
    assert c.reduce() == {}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_keeps_sn_fp32(tmp_path, precision):
    from test_train_e2e import load_ckpt, run
    run(tmp_path, "train.steps=2", "train.ckpt_every=2", f"train.precision={precision}")
    state = load_ckpt(str(tmp_path / "checkpoints" / "ckpt-000000002"))
    sn = [k for k in state if k.startswith("D.") and k.endswith(("._u", "._v", ".sigma"))]
    assert sn and all(state[k].dtype == torch.float32 for k in sn)
    assert all(torch.isfinite(state[k]).all() for k in state if state[k].is_floating_point())
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(last["loss/d"]) and math.isfinite(last["loss/g"])


@pytest.mark.slow
def test_in_process_training_restores_signal_handlers(tmp_path):
    """launch.compare (and tests) call the trainer in-process: afterwards SIGTERM must act as before,
    or forked workers (multiprocessing pools) inherit a handler that ignores it and hang."""
    import signal

    from trainer.main import main
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    assert main(["--out", str(tmp_path), *TINY, "train.steps=1", "train.resume=none"]) == 0
    assert {s: signal.getsignal(s) for s in before} == before
