"""Calibration of eval.compare's "works" criterion (recall >= 0.25): real images of the embedded
shapes10 data scored as if they were a generator, with classes missing.

    python benchmarks/recall_calibration.py shapes10-cnn 1000

Prints, for 10, 8, 5, 2 and 1 of the 10 classes kept, the scorer's FID, precision, recall and the
feature variance ratio against the reference statistics of the data (the figures in the README's
compare section). Recall falls with the classes kept (mode dropping); the variance ratio does not.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from data_pipelines.synthetic import render
from launch.compare_score import Scorer
from eval.data import open_source
from eval.extractors import build_extractor


def main(argv):
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("extractor", nargs="?", default="shapes10-cnn")
    p.add_argument("n", nargs="?", type=int, default=1000, help="images per scored set")
    args = p.parse_args(argv)
    ext_name, n = args.extractor, args.n
    scorer = Scorer(build_extractor(ext_name), n, batch_size=100)
    t = time.time()
    scorer.set_reference(open_source("synthetic:32"))
    print(f"reference statistics: {time.time() - t:.0f} s", flush=True)
    for keep in (10, 8, 5, 2, 1):
        idx = [i for i in range(n, 50000) if i % 10 < keep][:n]   # images not in the reference's first n
        batches = ((render(idx[b:b + 100], 32, 0)[0], torch.arange(b, min(b + 100, n))) for b in range(0, n, 100))
        r = scorer.score(*scorer._collect(batches, False))
        print(f"{keep} of 10 classes:", json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
