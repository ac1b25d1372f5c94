"""Profile of the embedded default run: making the data (shapes10) against the training step.

    python benchmarks/default_run.py                      # the default experiment, 2 threads
    OMP_NUM_THREADS=1 python benchmarks/default_run.py --rounds 20

In one process, interleaved round by round (so a busy machine slows every column alike), it times

- ``params``: the per-image random parameters of one D batch (``synthetic._params``),
- ``render``: one whole D batch of images (``synthetic.render``, parameters included),
- ``iteration``: one training iteration of the experiment's model through the trainer's own
  ``Loop._iteration`` (n_dis D steps + 1 G step, with its n_dis data batches),

and reports medians, the data's share of an iteration (n_dis * render / iteration) and the images
per second of the iteration. Indices are drawn as the training stream draws them (a random slice of a
permutation), so caching cannot flatter the render figure.
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

from data_pipelines import build_train_stream, synthetic
from trainer.build import build_parts
from trainer.config import load_config
from trainer.loop import Loop


def profile(exp: str, rounds: int, overrides=()) -> dict:
    cfg = load_config(exp, ["train.progress=false", "train.log_every=1000000", "train.resume=none", *overrides])
    if cfg.data.backend != "synthetic":
        raise SystemExit(f"--exp {exp}: data.backend is {cfg.data.backend}; this profile is of the synthetic data")
    device = torch.device("cpu")
    size, batch = cfg.data.synthetic_size, cfg.train.batch_size
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(1))
    times = {"params": [], "render": [], "iteration": []}
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_parts(cfg, device)
        loop = Loop(cfg, parts, parts.G, parts.D, device, tmp)
        loop.stream = build_train_stream(cfg.data, batch_size=loop.d_batch, seed=0)
        loop.data_iter = iter(loop.stream)
        loop._iteration()  # warm-up
        for r in range(rounds):
            idx = perm[(r * batch) % (size - batch):][:batch].tolist()
            t0 = time.perf_counter()
            synthetic._params(cfg.data.synthetic_seed, idx)
            t1 = time.perf_counter()
            synthetic.render(idx, cfg.data.resolution, cfg.data.synthetic_seed)
            t2 = time.perf_counter()
            loop._iteration()
            t3 = time.perf_counter()
            times["params"].append(t1 - t0)
            times["render"].append(t2 - t1)
            times["iteration"].append(t3 - t2)
        if loop.writer is not None:
            loop.writer.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    n_dis, g_batch = cfg.train.n_dis, cfg.train.g_batch_size or batch
    return {"exp": exp, "batch": batch, "n_dis": n_dis, "threads": torch.get_num_threads(), **med,
            "data_share": n_dis * med["render"] / med["iteration"],
            "img_per_s": (n_dis * batch + g_batch) / med["iteration"],
            "render_img_per_s": batch / med["render"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="default")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (each: params, render, one iteration)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="trainer config overrides")
    args = p.parse_args(argv)
    if args.rounds < 1:
        print(f"error: --rounds {args.rounds}: must be at least 1", file=sys.stderr)
        return 2
    r = profile(args.exp, args.rounds, args.overrides)
    print(f"{r['exp']}: batch {r['batch']}, n_dis {r['n_dis']}, {r['threads']} threads, {args.rounds} rounds (medians)")
    print(f"  params per batch   {1e3 * r['params']:8.2f} ms")
    print(f"  render per batch   {1e3 * r['render']:8.2f} ms  ({r['render_img_per_s']:.0f} images/s)")
    print(f"  iteration          {1e3 * r['iteration']:8.2f} ms  ({r['img_per_s']:.0f} images/s)")
    print(f"  data share of an iteration (n_dis x render / iteration): {100 * r['data_share']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
