"""Benchmark: images/s of a full training iteration (n_dis D steps + 1 G step), and the trainer's
overhead against a bare hand-written loop with the same modules, optimizers and data.

    python benchmarks/train_step.py                         # cifar10 ResNet + imagenet128, CPU
    python benchmarks/train_step.py --exps imagenet128 --batch 8 --device cuda --precision bf16

Both loops run interleaved in the same process (rounds of `--iters` iterations each), and the
report gives medians and the ratio ours / bare (goal <= 1.03). Images per iteration count the real
images D sees plus the images G generates for its own step (n_dis * batch + g_batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from data_pipelines import to_model_range
from trainer.build import build_parts
from trainer.config import load_config
from trainer.loop import Loop


def bare_iteration(parts, data_iter, n_dis, d_batch, g_batch, num_classes, device, autocast):
    """The textbook SN-GAN iteration, written out by hand (hinge loss)."""
    G, D, opt_g, opt_d = parts.G, parts.D, parts.opt_g, parts.opt_d
    D.requires_grad_(True)
    G.requires_grad_(False)
    for _ in range(n_dis):
        images, labels = next(data_iter)
        real = to_model_range(images, device)
        y_real = labels.to(device) if num_classes else None
        z = torch.randn(d_batch, G.z_dim, device=device)
        y_fake = torch.randint(num_classes, (d_batch,), device=device) if num_classes else None
        opt_d.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            with torch.no_grad():
                fake = G(z, y_fake)
            loss = torch.relu(1 - D(real, y_real).float()).mean() + torch.relu(1 + D(fake, y_fake).float()).mean()
        loss.backward()
        opt_d.step()
    z = torch.randn(g_batch, G.z_dim, device=device)
    y = torch.randint(num_classes, (g_batch,), device=device) if num_classes else None
    opt_g.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    G.requires_grad_(True)
    with torch.autocast(**autocast):
        loss = -D(G(z, y), y).float().mean()
    loss.backward()
    opt_g.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(exp, args, device):
    overrides = [f"train.batch_size={args.batch}", f"train.g_batch_size={args.g_batch or args.batch}",
                 f"train.precision={args.precision}", "data.backend=synthetic", "train.progress=false",
                 "train.log_every=1000000", "train.resume=none"]
    cfg = load_config(exp, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_parts(cfg, device)
        loop = Loop(cfg, parts, parts.G, parts.D, device, tmp)
        from data_pipelines import build_train_stream
        loop.stream = build_train_stream(cfg.data, batch_size=loop.d_batch, seed=0)
        loop.data_iter = iter(loop.stream)
        autocast = loop.autocast
        ours, bare = [], []
        for fn in (lambda: loop._iteration(),
                   lambda: bare_iteration(parts, loop.data_iter, cfg.train.n_dis, loop.d_batch, loop.g_batch,
                                          cfg.model.num_classes, device, autocast)):
            fn()  # warm-up
        for _ in range(args.rounds):
            for fn, times in ((lambda: loop._iteration(), ours),
                              (lambda: bare_iteration(parts, loop.data_iter, cfg.train.n_dis, loop.d_batch,
                                                      loop.g_batch, cfg.model.num_classes, device, autocast), bare)):
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                sync(device)
                times.append((time.perf_counter() - t0) / args.iters)
        if loop.writer is not None:   # opened by Loop.run(), which this benchmark bypasses
            loop.writer.close()
    per_iter = cfg.train.n_dis * cfg.train.batch_size + (cfg.train.g_batch_size or cfg.train.batch_size)
    mo, mb = statistics.median(ours), statistics.median(bare)
    return {"exp": exp, "batch": args.batch, "n_dis": cfg.train.n_dis, "s_per_iter_ours": mo, "s_per_iter_bare": mb,
            "img_per_s_ours": per_iter / mo, "img_per_s_bare": per_iter / mb, "ratio": mo / mb}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--exps", nargs="+", default=["cifar10_sngan_hinge_resnet", "imagenet128"])
    p.add_argument("--batch", type=int, default=8, help="D batch (global = per process here)")
    p.add_argument("--g-batch", type=int, default=0, help="G batch (0 = --batch)")
    p.add_argument("--iters", type=int, default=1, help="iterations per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per loop, interleaved")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print("| experiment | batch | n_dis | s/iter ours | s/iter bare | img/s ours | img/s bare | ours / bare |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for exp in args.exps:
        r = bench(exp, args, device)
        print(f"| {r['exp']} | {r['batch']} | {r['n_dis']} | {r['s_per_iter_ours']:.3f} | {r['s_per_iter_bare']:.3f} | "
              f"{r['img_per_s_ours']:.1f} | {r['img_per_s_bare']:.1f} | {r['ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
