"""Run the real trainer under a launcher and dump what this rank ended with (for test_train_e2e).

    accelerate launch --multi_gpu --num_processes 2 ... tests/ddp_probe.py OUT [key=value ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from trainer.config import load_config
from trainer.main import train


def main():
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config("default", overrides)
    seen = []

    def record_real_batches(loop):
        real = loop._real

        def wrapped():
            x, y = real()
            seen.append(x.double().sum().item())
            return x, y
        loop._real = wrapped

    loop = train(cfg, out, before_run=record_real_batches)
    torch.save({"G": loop.p.G.state_dict(), "D": loop.p.D.state_dict(), "seen": seen,
                "world": loop.world, "status": loop.status},
               os.path.join(out, f"probe-rank{loop.rank}.pt"))


if __name__ == "__main__":
    main()
