"""Cost of spectral normalization in a discriminator step: ours vs PyTorch's vs none.

For each resolution, one discriminator (``resnet32`` at 32 px, ``resnet128`` at 128 px) is built
three times with identical weights: with our ``models.spectral_norm`` (fp32 power iteration), with
``torch.nn.utils.parametrizations.spectral_norm`` on the same layers, and without normalization.
One timed step is forward + backward of D on a batch (what a D update costs besides the optimizer).
The variants are interleaved within every repetition (so a change in machine load hits all three
alike) and the median of the repetitions is reported, with the ratios ours/torch and ours/none.
A second table times SN alone: all W_SN of D computed and a gradient backpropagated through them,
no convolutions; it shows the SN cost itself, which in a full step at batch 64 can be smaller than
the run-to-run noise.

Run from the repository root, e.g. ``python benchmarks/sn_overhead.py --device cuda``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_discriminator, spectral_norm

VARIANTS = ("ours", "torch", "none")
MODELS = {32: "resnet32", 128: "resnet128"}


def build_variants(name: str, ch: int | None, classes: int, n_power_iterations: int):
    """Three copies of one D: our SN, torch's SN on the same layers, and none."""
    kwargs = {"num_classes": classes, "norm": "none"}
    if ch:
        kwargs["ch"] = ch
    plain = build_discriminator(name, **kwargs)
    variants = {"none": plain}
    for variant, apply in (("ours", spectral_norm), ("torch", torch_spectral_norm)):
        model = copy.deepcopy(plain)
        for module in list(model.modules()):
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
                apply(module, n_power_iterations=n_power_iterations)
        variants[variant] = model
    return variants


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(steps: dict, reps: int, warmup: int, device: torch.device, clock) -> dict:
    """Median time of each ``steps[variant]()``, the variants interleaved within every repetition
    and the one going first rotated, so that a change of machine load hits all of them alike."""
    names = list(steps)
    times = {v: [] for v in names}
    for rep in range(warmup + reps):
        k = rep % len(names)
        for variant in names[k:] + names[:k]:
            synchronize(device)
            start = clock()
            steps[variant]()
            synchronize(device)
            if rep >= warmup:
                times[variant].append(clock() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def d_step(model: nn.Module, x: torch.Tensor, y, autocast):
    """Forward + backward of D on a batch."""
    def step():
        model.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x, y)
        logits.float().mean().backward()
    return step


def sn_only_step(model: nn.Module, device: torch.device):
    """Only what SN adds: every W_SN computed (power iteration included) and a fixed gradient
    backpropagated from it to the raw weights, without any convolution."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    grads = [torch.randn_like(m.weight, device=device) for m in layers]

    def step():
        model.zero_grad(set_to_none=True)
        torch.autograd.backward([m.weight for m in layers], grads)
    return step


def run(resolution: int, batch: int, args, device: torch.device):
    torch.manual_seed(0)
    name = MODELS[resolution]
    ch = args.ch_128 if resolution == 128 else None
    models = build_variants(name, ch, args.classes, args.n_power_iterations)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for model in models.values():
        model.to(device=device, memory_format=memory_format).train()
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, args.classes, (batch,), device=device) if args.classes else None
    if args.autocast == "none":
        autocast = nullcontext
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
        autocast = lambda: torch.autocast(device.type, dtype=dtype)  # noqa: E731
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    full = interleaved_medians({v: d_step(models[v], x, y, autocast) for v in VARIANTS},
                               args.reps, args.warmup, device, clock)
    sn_only = interleaved_medians({v: sn_only_step(models[v], device) for v in ("ours", "torch")},
                                  args.sn_only_reps, args.warmup, device, clock)
    return name + (f" ch={ch}" if ch else ""), full, sn_only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--resolutions", default="32,128", help="comma-separated subset of 32,128")
    parser.add_argument("--batch", type=int, default=64, help="batch size at 32 px")
    parser.add_argument("--batch-128", type=int, default=64,
                        help="batch size at 128 px (on a CPU, 4-8 keeps a run to minutes)")
    parser.add_argument("--ch-128", type=int, default=None,
                        help="width of resnet128; None: the architecture's default, 64")
    parser.add_argument("--classes", type=int, default=0,
                        help="class-conditional D with this many classes (adds the SN embedding)")
    parser.add_argument("--n-power-iterations", type=int, default=1,
                        help="power-iteration steps per forward, both SN variants")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--sn-only-reps", type=int, default=200,
                        help="timed repetitions of the SN-alone measurement")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                        help="run the forward under torch.autocast with this dtype")
    parser.add_argument("--channels-last", action="store_true",
                        help="models and input in channels_last memory format")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; None: torch's own choice")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (CPU only: on a machine shared "
                             "with other jobs, --threads 1 --clock cpu measures the work itself)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU work; use the default wall clock on a GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    resolutions = [int(r) for r in args.resolutions.split(",")]
    for r in resolutions:
        if r not in MODELS:
            parser.error(f"--resolutions: {r} is not one of {sorted(MODELS)}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"# SN overhead: D forward+backward, {name}, torch {torch.__version__}, "
          f"autocast={args.autocast}, channels_last={args.channels_last}, {args.clock} clock, "
          f"median of {args.reps} interleaved reps\n")
    results = [(r, *run(r, args.batch if r == 32 else args.batch_128, args, device))
               for r in resolutions]
    print("D forward + backward on a batch:\n")
    print("| model | batch | ours (ms) | torch SN (ms) | none (ms) | ours/torch | ours/none "
          "| torch/none |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r, model, full, _ in results:
        m = {v: 1e3 * t for v, t in full.items()}
        batch = args.batch if r == 32 else args.batch_128
        print(f"| {model} | {batch} | {m['ours']:.2f} | {m['torch']:.2f} | {m['none']:.2f} "
              f"| {m['ours'] / m['torch']:.3f} | {m['ours'] / m['none']:.3f} "
              f"| {m['torch'] / m['none']:.3f} |")
    print("\nSN alone (every W_SN and its backward, no convolutions; median of "
          f"{args.sn_only_reps}):\n")
    print("| model | ours (ms) | torch SN (ms) | ours/torch |")
    print("|---|---:|---:|---:|")
    for _r, model, _, sn in results:
        print(f"| {model} | {1e3 * sn['ours']:.3f} | {1e3 * sn['torch']:.3f} "
              f"| {sn['ours'] / sn['torch']:.3f} |")

if __name__ == "__main__":
    main()
