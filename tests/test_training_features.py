"""What users of GAN training systems reach for (issue 15) and the CUDA fast path's flags exercised on
the CPU (issue 14): experiment trackers through accelerate (real W&B offline and MLflow file
store), FID while training with the best checkpoint, fine-tuning from another run, torch.compile,
fused Adam, TF32/cuDNN flags."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow
MAIN = os.path.join(ROOT, "trainer", "main.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def train(out, *args, env=None, timeout=300):
    proc = subprocess.run([sys.executable, MAIN, "--out", str(out), *TINY, *args], capture_output=True, text=True,
                          cwd=ROOT, env={**ENV, **(env or {})}, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def wandb_history(run_dir):
    """The history records of an offline W&B run, read from its .wandb file (W&B's LevelDB-style
    log of protobuf records: a 7-byte file header, 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb
    path = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))[0]
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, chunks, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            chunks.append(buf + chunk)
    history = []
    for raw in chunks:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return history


def test_trackers_tensorboard_wandb_mlflow_get_scalars_and_the_sample_grid(tmp_path):
    run = tmp_path / "run"
    train(run, "train.steps=4", "train.log_every=2", "train.sample_every=2",
          "train.log_with=tensorboard,wandb,mlflow")
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss_d = {r["step"]: r["loss/d"] for r in jsonl}
    # TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss/d")} == pytest.approx(loss_d)
    assert [e.step for e in events.Images("samples")] == [2, 4]
    # W&B (offline)
    history = wandb_history(str(run))
    assert {h["_step"]: h["loss/d"] for h in history if "loss/d" in h} == pytest.approx(loss_d)
    images = glob.glob(str(run / "wandb" / "offline-run-*" / "files" / "media" / "images" / "samples_*.png"))
    assert len(images) == 2
    # MLflow (file store in the run folder)
    from mlflow.tracking import MlflowClient
    ids = json.loads((run / "trackers.json").read_text())
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri="file:" + str(run / "mlruns"))
    got = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "loss/d")}
    assert got == pytest.approx(loss_d)
    artifacts = [a.path for a in client.list_artifacts(ids["mlflow"], "samples")]
    assert artifacts == ["samples/step-000000002.png", "samples/step-000000004.png"]
    # A resumed run logs into the same W&B and MLflow runs.
    train(run, "train.steps=6", "train.log_every=2", "train.sample_every=2", "train.log_with=tensorboard,wandb,mlflow")
    assert json.loads((run / "trackers.json").read_text())["mlflow"] == ids["mlflow"]
    assert 6 in {m.step for m in client.get_metric_history(ids["mlflow"], "loss/d")}


def test_fid_while_training_best_checkpoint_survives_pruning(tmp_path):
    from eval.data import open_source
    from eval.extractors import build_extractor
    from eval.reference import compute_reference
    ref = compute_reference(open_source("synthetic:32:300"), build_extractor("tiny-test"), str(tmp_path / "ref.npz"),
                            workers=0)
    run = tmp_path / "run"
    proc = train(run, "train.steps=6", "train.ckpt_every=2", "train.keep_ckpts=1", "train.eval_every=1",
                 "train.eval_extractor=tiny-test", "train.eval_num_samples=100", f"train.eval_ref={ref}")
    evals = {r["step"]: r["eval/fid"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval/fid" in r}
    assert sorted(evals) == [2, 4, 6]
    best_step = min(evals, key=evals.get)
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == best_step and best["value"] == pytest.approx(evals[best_step])
    assert os.path.realpath(run / "best") == str(run / "checkpoints" / f"ckpt-{best_step:09d}")
    assert (run / "checkpoints" / f"ckpt-{best_step:09d}" / "meta.json").exists()   # keep_ckpts=1 kept it
    last = proc.stdout.strip().splitlines()[-1]
    assert f"final fid {evals[6]:.4g} at step 6" in last and f"best fid {evals[best_step]:.4g} at step {best_step}" in last
    # The evaluator and the sampler accept RUN/best.
    res = subprocess.run([sys.executable, "-m", "eval.main", "--ckpt", str(run / "best"), "--ref", ref, "--extractor",
                          "tiny-test", "--num-samples", "100"], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["fid"] == pytest.approx(evals[best_step], rel=1e-9)


def test_init_from_loads_weights_with_fresh_optimizers_and_refuses_mismatches(tmp_path):
    from trainer.checkpoint import load_modules
    from trainer.config import load_config
    from trainer.main import train as train_in_process
    train(tmp_path / "src", "train.steps=2", "train.ckpt_every=2", "train.ema_half_life_kimg=1")
    src_ckpt = str(tmp_path / "src" / "checkpoints" / "ckpt-000000002")
    seen = {}

    def capture(loop):
        seen["step"] = loop.step
        seen["G"] = {k: v.clone() for k, v in loop.p.G.state_dict().items()}
        seen["D"] = {k: v.clone() for k, v in loop.p.D.state_dict().items()}
        seen["opt_state"] = len(loop.p.opt_g.state)

    cfg = load_config("default", [*TINY, "train.steps=1", "train.ema_half_life_kimg=1", f"train.init_from={tmp_path / 'src'}"])
    train_in_process(cfg, str(tmp_path / "ft"), before_run=capture)
    from trainer.build import build_parts
    ref = build_parts(load_config("default", [*TINY, "train.ema_half_life_kimg=1"]), torch.device("cpu"))
    load_modules(src_ckpt, {"G": ref.G, "D": ref.D})
    assert seen["step"] == 0 and seen["opt_state"] == 0
    for name, module in (("G", ref.G), ("D", ref.D)):
        for key, value in module.state_dict().items():
            assert torch.equal(seen[name][key], value), f"{name}.{key} not loaded"
    # Another z_dim: refused with the tensor named; with init_strict=false the rest is loaded.
    bad = subprocess.run([sys.executable, MAIN, "--out", str(tmp_path / "bad"), *TINY, "train.steps=1",
                          "model.z_dim=17", f"train.init_from={tmp_path / 'src'}"], capture_output=True, text=True,
                         cwd=ROOT, env=ENV)
    assert bad.returncode == 2 and "G.linear.weight: source (128, 16) vs model (128, 17)" in bad.stderr, bad.stderr
    ok = train(tmp_path / "loose", "train.steps=1", "model.z_dim=17", f"train.init_from={tmp_path / 'src'}",
               "train.init_strict=false")
    assert "skipped 2 tensor(s)" in ok.stdout and "G.linear.weight" in ok.stdout and "G_ema.linear.weight" in ok.stdout


def test_compile_fused_adam_and_cuda_flags_on_cpu(tmp_path):
    """Every CUDA fast-path branch runs here with its flag on: torch.compile of G and D (with SN's
    custom op), fused Adam, TF32/cuDNN flags; the checkpoint of a compiled run loads into plain modules."""
    run = tmp_path / "compiled"
    train(run, "train.steps=2", "train.ckpt_every=2", "train.compile=true", "optim.implementation=fused",
          "train.compile_max_recompiles=4", timeout=600)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("loss/d", "loss/g"))
    from trainer.build import build_parts, optimizer_kernels, set_backend_flags
    from trainer.checkpoint import load_modules
    from trainer.config import load_config
    cfg = load_config("default", [*TINY, "train.tf32=true", "train.cudnn_benchmark=true"])
    parts = build_parts(cfg, torch.device("cpu"))
    load_modules(str(run / "checkpoints" / "ckpt-000000002"), {"G": parts.G, "D": parts.D})
    assert optimizer_kernels(cfg, torch.device("cuda")) == {"fused": True}
    assert optimizer_kernels(cfg, torch.device("cpu")) == {"foreach": True}
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        set_backend_flags(cfg, torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before


def test_fused_foreach_and_loop_adam_give_the_same_update():
    from trainer.build import make_optimizer
    from trainer.config import load_config
    results = []
    for impl in ("fused", "foreach", "loop"):
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 4)
        opt = make_optimizer(load_config("default", [f"optim.implementation={impl}"]), layer, 1e-2)
        for _ in range(3):
            opt.zero_grad()
            layer(torch.randn(5, 8, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
            opt.step()
        results.append(layer.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[1], results[2], rtol=1e-6, atol=1e-7)
