"""The sections of ``benchmarks/device_check.py`` (see its docstring): environment, spectral norm,
throughput, host syncs, loader, real run, and the helpers they share. Each ``section_*(args, out, ...)``
fills ``out`` (its JSON entry) or raises ``Skip`` / ``CheckFailed``; the orchestration, the report
and the command line are in device_check.py."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
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

def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


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
            except Exception as exc:
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
        except Exception as exc:
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
