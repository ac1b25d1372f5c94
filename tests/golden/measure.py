"""Measure how far our trainer is from each golden fixture, as is and with one op changed.

    python -m golden.measure            # from tests/ (or: python tests/golden/measure.py)
    python tests/golden/measure.py --json out.json

For every fixture: the largest relative difference of the losses and of the final tensors after K
iterations, (a) our float64 replay, (b) our float32 replay (the same inputs and initial values cast
to float32, against the float64 reference: what float32 arithmetic alone costs over K iterations),
and (c) float64 with each alternative that stays available as a config key (SN's power-iteration
order, the update order, Adam's eps placement): the figures docs/fidelity.md states.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.dirname(here), os.path.dirname(os.path.dirname(here))]

import torch

from golden.harness import build_config, compare, fixture_paths, load_fixture, replay


def alternatives(cfg) -> dict:
    alt = {"update_order": f"train.update_order={'d_first' if cfg.train.update_order == 'g_first' else 'g_first'}"}
    if cfg.model.d_constraint == "sn":
        alt["sn_iteration=uv"] = "model.sn_iteration=uv"
        alt["sn_warmup=15"] = "model.sn_warmup=15"
    if cfg.optim.name == "adam":
        alt["adam"] = f"optim.adam={'torch' if cfg.optim.adam == 'chainer' else 'chainer'}"
    return alt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("-k", default="", help="only fixtures whose name contains this")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = {}
    for path in fixture_paths():
        fx = load_fixture(path)
        if args.k not in fx.name:
            continue
        cfg = build_config(fx)
        row = {"reference": fx.meta["reference"], "experiment": fx.meta["experiment"],
               "K": fx.meta["iterations"], "n_dis": fx.meta["n_dis"]}
        free = ()
        for label, dtype, extra in [("float64", torch.float64, None), ("float32", torch.float32, None)] + [
                (f"float64 {k}", torch.float64, v) for k, v in alternatives(cfg).items()]:
            d = compare(fx, replay(fx, extra=[extra] if extra else [], dtype=dtype), free)
            free = free or tuple(d.noise)
            row[label] = {"loss": d.loss, "tensor": d.tensor, "worst_tensor": d.tensor_at}
            print(f"{fx.name:34s} {label:26s} {d}", flush=True)
        out[fx.name] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
