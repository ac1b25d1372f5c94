"""Cost model of a training run: FLOPs per iteration, schedule FLOPs, wall time, GPU-hours, DDP traffic.

    python benchmarks/cost.py --exp imagenet128                           # 1 H100 at 40% MFU
    python benchmarks/cost.py --exp imagenet128,imagenet256 --gpus 1,8,32 --mfu cpu,0.4
    python benchmarks/cost.py --all --gpu A100 --bandwidth 50 --json cost.json

FLOPs per training iteration (``train.steps`` counts these) are counted with
``torch.utils.flop_counter.FlopCounterMode`` over what the trainer's loop (``trainer/loop.py``)
computes: ``n_dis`` D steps (G forward without grad on the fake batch, D forward on real and on
fake, backward, the constraint's penalty if any) and one G step (G and D forward, backward through
both). The models are built on the ``meta`` device, so the count needs no memory and no compute
(imagenet128 at its full batch takes about a second); ``tests/test_cost_model.py`` checks that it
equals the count of a real ``Loop`` iteration on CPU tensors. The optimizers' element-wise updates,
BatchNorm and activations are not counted (FlopCounterMode counts matrix products and convolutions
only, the usual convention of MFU); the spectral norm's matrix-vector products, dots and rank-1
updates are added (``SN_FORMULAS``), and are < 0.02% of the total.

Time at a model FLOP utilization ``mfu`` on ``gpus`` GPUs of dense bf16 peak ``peak`` (FLOP/s,
``PEAK_BF16_TFLOPS``), for ``steps`` iterations with a fixed global batch (data parallel):

    compute_s   = flops_per_iter / (gpus * peak * mfu)
    allreduce_s = (n_dis * D_grad_bytes + G_grad_bytes) * 2 (gpus - 1) / gpus / bandwidth
    wall_s      = steps * (compute_s + allreduce_s),   gpu_hours = wall_s * gpus / 3600

DDP all-reduces each backward's gradients (fp32, as the parameters) once: D's after each of the
``n_dis`` D steps, G's after the G step; a ring all-reduce sends and receives 2 (N - 1) / N of the
bytes on every GPU. The all-reduce time is added to the compute time (no overlap with the
backward: an upper bound; DDP overlaps part of it). Buffer broadcasts (SN's u, v; BN statistics)
are a few MB per iteration and are left out.

``--mfu cpu`` uses the MFU measured here on the CPU: one real training iteration of ``--cpu-exp``
(default: the embedded ``default`` experiment) timed through the trainer's loop, its counted FLOPs
divided by the time, against the fp32 matmul peak of this CPU measured with the same threads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models  # noqa: E402
from trainer.build import discriminator_kwargs, generator_kwargs  # noqa: E402
from trainer.config import Config, available_experiments, load_config  # noqa: E402
from trainer.losses import get_loss  # noqa: E402
from trainer.regularizers import build_constraint  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from the vendors' data sheets.
# Matched as substrings of torch.cuda.get_device_name() (upper case), most specific first.
PEAK_BF16_TFLOPS = (
    ("B200", 2250.0), ("H200", 989.0), ("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 4090", 165.0), ("RTX 6000 ADA", 364.0), ("A6000", 155.0), ("A40", 150.0), ("A10G", 70.0),
    ("A10", 125.0),
)


def peak_tflops(gpu_name: str) -> Optional[float]:
    """Dense bf16 peak of a GPU by name (e.g. 'NVIDIA H100 80GB HBM3' -> 989), None when not listed."""
    name = gpu_name.upper()
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


# --------------------------------------------------------------------------- counting

# FlopCounterMode counts mm/conv/bmm only; the spectral norm's power iteration and its backward
# (models/spectral_norm.py) use mv, dot and addr. Formulas take shapes (FlopCounterMode's custom_mapping).
def _mv_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _dot_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


def _addr_flop(self_shape, u_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * u_shape[0] * v_shape[0]


SN_FORMULAS = {torch.ops.aten.mv: _mv_flop, torch.ops.aten.dot: _dot_flop, torch.ops.aten.addr: _addr_flop}


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker: totals only. The tracker's hooks on module
    inputs make ``autograd.grad(create_graph=True)`` (the WGAN-GP penalty) fail in torch 2.14
    ("A leaf node was passed to _will_engine_execute_node ..."); the totals are the same."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False, custom_mapping=SN_FORMULAS)
    counter.mod_tracker = _GlobalOnly()
    return counter


def build_models(cfg: Config, device: torch.device | str = "meta"):
    """G, D and the D constraint of ``cfg``, built directly on ``device`` (meta: structure only)."""
    m, loss = cfg.model, cfg.loss
    constraint = build_constraint(m.d_constraint, loss.gp_weight, loss.orth_weight, loss.clip_value)
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        G = models.build_generator(m.g, **generator_kwargs(cfg))
        D = models.build_discriminator(m.d, **discriminator_kwargs(cfg, constraint))
    return G, D, constraint


def iteration_flops(cfg: Config, device: torch.device | str = "meta") -> Dict:
    """FLOPs of one training iteration of ``cfg`` (one process holding the global batch).

    Mirrors ``trainer.loop.Loop``'s phases op for op (tests/test_cost_model.py compares the two).
    Returns ``{"flops", "by_op", "d_params", "g_params"}`` (parameter counts: trainable elements).
    """
    device = torch.device(device)
    G, D, constraint = build_models(cfg, device)
    loss = get_loss(cfg.loss.name)
    t, nc, res = cfg.train, cfg.model.num_classes, cfg.data.resolution
    d_batch, g_batch = t.batch_size, t.g_batch_size or t.batch_size

    def latents(n):
        z = torch.randn(n, G.z_dim, device=device)
        return z, (torch.randint(nc, (n,), device=device) if nc else None)

    with flop_counter() as counter:
        G.requires_grad_(False)
        D.requires_grad_(True)
        for _ in range(t.n_dis):
            real = torch.rand(d_batch, 3, res, res, device=device).mul_(2).sub_(1)
            y_real = torch.randint(nc, (d_batch,), device=device) if nc else None
            z, y_fake = latents(d_batch)
            with torch.no_grad():
                fake = G(z, y_fake)
            d_loss = loss.d_loss(D(real, y_real).float(), D(fake, y_fake).float())
            if constraint.penalty is not None:
                d_loss = d_loss + constraint.penalty(D, real, fake, y_real)
            d_loss.backward()
        G.requires_grad_(True)
        D.requires_grad_(False)
        z, y = latents(g_batch)
        loss.g_loss(D(G(z, y), y).float()).backward()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return {"flops": int(counter.get_total_flops()), "by_op": by_op,
            "d_params": sum(p.numel() for p in D.parameters()), "g_params": sum(p.numel() for p in G.parameters())}


# --------------------------------------------------------------------------- the time formula

def ring_allreduce_bytes(nbytes: float, gpus: int) -> float:
    """Bytes each GPU sends (and receives) in a ring all-reduce of ``nbytes``."""
    return nbytes * 2 * (gpus - 1) / gpus if gpus > 1 else 0.0


def schedule_cost(flops_per_iter: float, steps: int, gpus: int, peak_flops: float, mfu: float,
                  d_grad_bytes: float, g_grad_bytes: float, n_dis: int, bandwidth: float) -> Dict:
    """Wall time and GPU-hours of ``steps`` iterations (the formula of the module docstring).

    ``peak_flops`` per GPU (FLOP/s), ``bandwidth`` in bytes/s per GPU, ``mfu`` in (0, 1].
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if gpus < 1 or bandwidth <= 0 or peak_flops <= 0:
        raise ValueError(f"need gpus >= 1, bandwidth > 0 and peak > 0; got {gpus}, {bandwidth}, {peak_flops}")
    compute_s = flops_per_iter / (gpus * peak_flops * mfu)
    moved = ring_allreduce_bytes(n_dis * d_grad_bytes + g_grad_bytes, gpus)
    comm_s = moved / bandwidth
    wall_s = steps * (compute_s + comm_s)
    return {"compute_s_per_iter": compute_s, "allreduce_bytes_per_iter": moved, "allreduce_s_per_iter": comm_s,
            "total_flops": flops_per_iter * steps, "wall_s": wall_s, "wall_h": wall_s / 3600,
            "gpu_hours": wall_s * gpus / 3600}


# --------------------------------------------------------------------------- measurements

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5) -> float:
    """Best achieved FLOP/s of an n x n x n matmul (the measured peak of this device and dtype)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def batch_pool(cfg: Config, device: torch.device, batches: int = 2) -> list:
    """A few uint8 (images, labels) batches of the synthetic data, already on ``device``: the
    compute is measured without a loader (benchmarks/device_check.py times loaders separately)."""
    from data_pipelines import build_train_stream
    data = cfg.data
    synthetic = type(data)(backend="synthetic", resolution=data.resolution, num_workers=0,
                           synthetic_size=max(64, cfg.train.batch_size * batches))
    stream = iter(build_train_stream(synthetic, batch_size=cfg.train.batch_size, seed=0))
    return [tuple(t.to(device) for t in next(stream)) for _ in range(batches)]


class LoopBench:
    """The trainer's own ``Loop`` (built as trainer/main.py builds it, optionally compiled) fed from
    a fixed pool of device batches; ``time(iters)`` returns seconds per iteration."""

    def __init__(self, cfg: Config, device: torch.device, compile_backend: Optional[str] = None):
        from trainer import build
        from trainer.loop import Loop
        self.cfg, self.device = cfg, device
        self.tmp = tempfile.TemporaryDirectory(prefix="sngan-bench-")
        set_flags = getattr(build, "set_backend_flags", None)   # TF32 / cuDNN autotuning as the trainer sets them
        if set_flags is not None:
            set_flags(cfg, device)
        self.parts = build.build_parts(cfg, device)
        if compile_backend:
            self.parts.G.compile(backend=compile_backend)
            self.parts.D.compile(backend=compile_backend)
        self.loop = Loop(cfg, self.parts, self.parts.G, self.parts.D, device, self.tmp.name)
        self.pool = batch_pool(cfg, device)
        self.loop.data_iter = itertools.cycle(self.pool)

    def time(self, iters: int) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(iters):
            self.loop._iteration()
        synchronize(self.device)
        return (time.perf_counter() - start) / iters

    def close(self) -> None:
        writer = getattr(self.loop, "writer", None)  # Loop.prepare() opens it; this bench never calls prepare()
        if writer is not None:
            writer.close()
        self.tmp.cleanup()


def measure_cpu_mfu(exp: str = "default", overrides: Sequence[str] = (), iters: int = 3, warmup: int = 1) -> Dict:
    """Achieved FLOP/s of real training iterations of ``exp`` on this CPU over its measured fp32 matmul peak."""
    device = torch.device("cpu")
    cfg = load_config(exp, ["train.progress=false", "train.log_every=1000000", *overrides])
    flops = iteration_flops(cfg)["flops"]
    bench = LoopBench(cfg, device)
    try:
        bench.time(warmup)
        times = [bench.time(1) for _ in range(iters)]
    finally:
        bench.close()
    s_per_iter = statistics.median(times)
    peak = matmul_peak(device, torch.float32)
    achieved = flops / s_per_iter
    return {"exp": exp, "overrides": list(overrides), "flops_per_iter": flops, "s_per_iter": s_per_iter,
            "achieved_flops_per_s": achieved, "matmul_peak_flops_per_s": peak, "mfu": achieved / peak,
            "threads": torch.get_num_threads(), "iters": iters,
            "how": (f"median of {iters} real training iterations of '{exp}' (fp32, trainer.loop.Loop on CPU, "
                    f"{torch.get_num_threads()} thread(s)); FLOPs counted with FlopCounterMode; peak = best "
                    f"1024^3 fp32 matmul with the same threads")}


# --------------------------------------------------------------------------- command line

def _fmt_h(hours: float) -> str:
    return f"{hours:.2g}" if hours < 10 else f"{hours:,.0f}"


def cost_rows(exps: Sequence[str], gpus_list: Sequence[int], mfus: Sequence, peak_flops: float,
              bandwidth: float) -> List[Dict]:
    """One row per (experiment, GPU count, MFU); an MFU is a float or ("cpu", value)."""
    rows = []
    for exp in exps:
        cfg = load_config(exp)
        t = cfg.train
        count = iteration_flops(cfg)
        for gpus, mfu in itertools.product(gpus_list, mfus):
            label, value = mfu if isinstance(mfu, tuple) else (f"{mfu:.0%}", mfu)
            cost = schedule_cost(count["flops"], t.steps, gpus, peak_flops, value, 4 * count["d_params"],
                                 4 * count["g_params"], t.n_dis, bandwidth)
            rows.append({"exp": exp, "steps": t.steps, "batch": t.batch_size, "g_batch": t.g_batch_size or t.batch_size,
                         "n_dis": t.n_dis, "flops_per_iter": count["flops"], "by_op": count["by_op"],
                         "d_params": count["d_params"], "g_params": count["g_params"], "gpus": gpus,
                         "per_gpu_batch": t.batch_size / gpus, "mfu": value, "mfu_label": label, **cost})
    return rows


def markdown(rows: List[Dict], gpu: str, peak_tflops_value: float, bandwidth_gbps: float) -> str:
    lines = [f"Peak {peak_tflops_value:g} TFLOP/s dense bf16 per GPU ({gpu}), all-reduce at {bandwidth_gbps:g} GB/s "
             f"per GPU, added to compute (no overlap).", "",
             "| experiment | iterations | D / G batch (per GPU D) | n_dis | TFLOP / iter | total PFLOP | GPUs | MFU | "
             "compute ms / iter | all-reduce MB / iter | all-reduce ms / iter | wall h | GPU-hours |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        per_gpu = f"{r['per_gpu_batch']:g}"
        lines.append(
            f"| `{r['exp']}` | {r['steps']:,} | {r['batch']} / {r['g_batch']} ({per_gpu}) | {r['n_dis']} | "
            f"{r['flops_per_iter'] / 1e12:.2f} | {r['total_flops'] / 1e15:,.0f} | {r['gpus']} | {r['mfu_label']} | "
            f"{r['compute_s_per_iter'] * 1e3:.2f} | {r['allreduce_bytes_per_iter'] / 1e6:,.0f} | "
            f"{r['allreduce_s_per_iter'] * 1e3:.2f} | {_fmt_h(r['wall_h'])} | {_fmt_h(r['gpu_hours'])} |")
    return "\n".join(lines)


def _int_list(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated GPU counts, e.g. 1,8,32") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: GPU counts must be >= 1")
    return values


def _mfu_list(text: str) -> List:
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item == "cpu":
            out.append("cpu")
            continue
        try:
            value = float(item.rstrip("%")) / (100 if item.endswith("%") else 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: an MFU is a fraction (0.4), a percentage (40%) "
                                             f"or 'cpu'") from None
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"MFU {item!r} must be in (0, 1]")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("no MFU given")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/cost.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog=f"experiments: {', '.join(available_experiments())}")
    p.add_argument("--exp", default="imagenet128", help="experiment(s), comma-separated")
    p.add_argument("--all", action="store_true", help="every experiment in launch/experiments (overrides --exp)")
    p.add_argument("--gpus", type=_int_list, default="1", help="GPU counts, comma-separated (global batch fixed)")
    p.add_argument("--mfu", type=_mfu_list, default="0.4",
                   help="model FLOP utilization(s), comma-separated: 0.4, 40%% or 'cpu' (measured on this CPU: "
                        "real iterations of --cpu-exp against its fp32 matmul peak)")
    p.add_argument("--gpu", default="H100", help="GPU name for the peak table (%s)" %
                   ", ".join(k for k, _ in PEAK_BF16_TFLOPS))
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per GPU; overrides --gpu")
    p.add_argument("--bandwidth", type=float, default=100.0, help="all-reduce bandwidth per GPU, GB/s")
    p.add_argument("--cpu-exp", default="default", help="experiment whose real iterations measure the CPU MFU")
    p.add_argument("--cpu-iters", type=int, default=3, help="timed iterations for the CPU MFU (median)")
    p.add_argument("--json", default=None, help="also write rows and measurements as JSON here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    exps = available_experiments() if args.all else [e.strip() for e in args.exp.split(",") if e.strip()]
    peak = args.peak_tflops or peak_tflops(args.gpu)
    if peak is None:
        print(f"error: --gpu {args.gpu!r} is not in the peak table ({', '.join(k for k, _ in PEAK_BF16_TFLOPS)}); "
              f"give --peak-tflops", file=sys.stderr)
        return 2
    cpu = None
    mfus = []
    for m in args.mfu:
        if m == "cpu":
            if cpu is None:
                cpu = measure_cpu_mfu(args.cpu_exp, iters=args.cpu_iters)
            mfus.append((f"{cpu['mfu']:.1%} (CPU)", cpu["mfu"]))
        else:
            mfus.append(m)
    rows = cost_rows(exps, args.gpus, mfus, peak * 1e12, args.bandwidth * 1e9)
    print(markdown(rows, args.gpu if args.peak_tflops is None else "--peak-tflops", peak, args.bandwidth))
    if cpu is not None:
        print(f"\nMFU measured on CPU-equivalent FLOPs: {cpu['mfu']:.1%} ({cpu['achieved_flops_per_s'] / 1e9:.1f} "
              f"GFLOP/s achieved, {cpu['s_per_iter']:.3f} s per iteration of {cpu['flops_per_iter'] / 1e9:.2f} GFLOP, "
              f"against {cpu['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s fp32 matmul peak); {cpu['how']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": args.gpu, "peak_tflops": peak, "bandwidth_gbps": args.bandwidth, "rows": rows,
                       "cpu_mfu": cpu}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
