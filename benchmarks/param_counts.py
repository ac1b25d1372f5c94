"""Print a markdown table of parameter counts of every registered model at its default width.

Models are built on the meta device (structure only, no memory). 128 and 256 px models are counted
class-conditional with 1000 classes (ImageNet, projection discriminator), 32 and 48 px ones
unconditional. Run from the repository root: ``python benchmarks/param_counts.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_discriminator, build_generator, discriminator_names, generator_names


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000,
                        help="number of classes for the 128/256 px (conditional) models")
    args = parser.parse_args()

    rows = []
    for name in generator_names():
        with torch.device("meta"):
            g = build_generator(name)
            classes = args.classes if g.resolution >= 128 else 0
            g = build_generator(name, num_classes=classes)
            d = build_discriminator(name, num_classes=classes)
        rows.append((name, g.resolution, classes, count(g), count(d)))
    for name in sorted(set(discriminator_names()) - set(generator_names())):  # D-only layouts (cnn32code)
        with torch.device("meta"):
            d = build_discriminator(name)
        rows.append((f"{name} (D only)", d.resolution, 0, None, count(d)))
    rows.sort(key=lambda r: (r[1], r[0]))

    print("| model | resolution | classes | G parameters | D parameters |")
    print("|---|---:|---:|---:|---:|")
    for name, res, classes, g_count, d_count in rows:
        g_text = "-" if g_count is None else f"{g_count:,} ({g_count / 1e6:.2f} M)"
        print(f"| {name} | {res} | {classes or '-'} | {g_text} | {d_count:,} ({d_count / 1e6:.2f} M) |")


if __name__ == "__main__":
    main()
