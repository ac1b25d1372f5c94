"""benchmarks/cost.py: the meta-device FLOP count against real iterations, its scaling, the time formula."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import cost
from conftest import TINY
from trainer.config import load_config

TINY_COUNT = [o for o in TINY if not o.startswith(("train.log_every", "train.sample_every"))] + [
    "train.log_every=1000000"]


def real_loop_flops(cfg, counter=None):
    """FLOPs of one iteration of the trainer's own Loop on real CPU tensors."""
    bench = cost.LoopBench(cfg, torch.device("cpu"))
    try:
        with (counter or cost.flop_counter()) as c:
            bench.loop._iteration()
        return c.get_total_flops(), {str(k): v for k, v in c.get_flop_counts()["Global"].items()}
    finally:
        bench.close()


@pytest.mark.parametrize("exp,extra", [
    ("default", ["train.n_dis=2", "train.g_batch_size=12"]),      # conditional ResNet, SN, projection head
    ("cifar10_wgangp_cnn", ["train.n_dis=1"]),                    # gradient penalty: double backward
])
def test_meta_count_equals_the_real_loop_iteration(exp, extra):
    cfg = load_config(exp, TINY_COUNT + extra)
    meta = cost.iteration_flops(cfg, "meta")
    real, real_by_op = real_loop_flops(cfg)
    assert meta["flops"] == real > 0
    assert meta["by_op"] == real_by_op
    if cfg.model.d_constraint == "sn":  # the power iteration's products are counted
        assert meta["by_op"]["aten.mv"] > 0
    # On CPU tensors the count is the same as on meta.
    assert cost.iteration_flops(cfg, "cpu")["flops"] == real


def test_global_only_counter_matches_flop_counter_mode():
    """The adapter that drops FlopCounterMode's module tracker changes no total."""
    cfg = load_config("default", TINY_COUNT)
    plain = FlopCounterMode(display=False, custom_mapping=cost.SN_FORMULAS)
    assert real_loop_flops(cfg, plain)[0] == real_loop_flops(cfg)[0]


def test_flops_are_affine_in_the_batch_with_only_the_sn_products_fixed():
    counts = {}
    for b in (8, 16, 24):
        counts[b] = cost.iteration_flops(load_config("default", TINY_COUNT + [f"train.batch_size={b}"]))
    f8, f16, f24 = (counts[b]["flops"] for b in (8, 16, 24))
    assert f24 - f16 == f16 - f8 > 0                      # linear in the batch ...
    fixed = 2 * f8 - f16                                  # ... plus a batch-independent part:
    sn = sum(counts[8]["by_op"][k] for k in ("aten.mv", "aten.dot", "aten.addr"))
    assert fixed == sn                                    # exactly the spectral norm's products
    assert fixed < 0.01 * f8


def test_time_formula_on_a_hand_computed_example():
    # 1e15 FLOP per iteration on 4 GPUs of 1e15 FLOP/s at 50% MFU: 0.5 s of compute per iteration.
    # Gradients: D 100 MB x n_dis 5 + G 200 MB = 700 MB; ring all-reduce moves 2 * 3/4 of it = 1.05 GB
    # at 10 GB/s = 0.105 s. 1000 iterations: 605 s wall, 4 GPUs -> 605 * 4 / 3600 GPU-hours.
    c = cost.schedule_cost(1e15, 1000, 4, 1e15, 0.5, 100e6, 200e6, 5, 10e9)
    assert c["compute_s_per_iter"] == pytest.approx(0.5)
    assert c["allreduce_bytes_per_iter"] == pytest.approx(1.05e9)
    assert c["allreduce_s_per_iter"] == pytest.approx(0.105)
    assert c["wall_s"] == pytest.approx(605.0)
    assert c["gpu_hours"] == pytest.approx(605 * 4 / 3600)
    assert c["total_flops"] == pytest.approx(1e18)
    one = cost.schedule_cost(1e15, 1000, 1, 1e15, 0.5, 100e6, 200e6, 5, 10e9)
    assert one["allreduce_s_per_iter"] == 0 and one["wall_s"] == pytest.approx(1000 * 2.0)  # 1 GPU: 2 s, no all-reduce
    with pytest.raises(ValueError, match="mfu"):
        cost.schedule_cost(1e15, 1, 1, 1e15, 0.0, 0, 0, 1, 1e9)


def test_peak_table_matches_device_names():
    assert cost.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert cost.peak_tflops("NVIDIA H100 PCIe") == 756
    assert cost.peak_tflops("NVIDIA H200") == 989
    assert cost.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert cost.peak_tflops("NVIDIA A10") == 125
    assert cost.peak_tflops("NVIDIA L40S") == 362 and cost.peak_tflops("NVIDIA L4") == 121
    assert cost.peak_tflops("Some CPU") is None


def test_cli_prints_the_table(capsys):
    assert cost.main(["--exp", "default", "--gpus", "1,2", "--mfu", "0.4,50%"]) == 0
    out = capsys.readouterr().out
    assert out.count("| `default` |") == 4 and "| 40% |" in out and "| 50% |" in out
