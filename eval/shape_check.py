"""Does a shapes10 generator draw the shapes, or only the colours? ``python -m eval.shape_check RUN``.

A small CNN that sees only the *shape*: it is trained on grayscale images of the five shapes
(circle, square, triangle, cross, ring) drawn in random colours on random dark backgrounds, with
wider size and position ranges than the data set's, and each image is standardised (zero mean, unit
variance) before it sees it. Colour, brightness and contrast therefore carry no information, and a
generator that paints a blob of the right colour scores no better than chance on the classes whose
shape is not a disc (about 2 of 10 classes right, the two circle classes).

For a run folder, checkpoint or ``generator.safetensors`` it generates ``--per-class`` samples of
each class (the evaluator's plan and noise, :mod:`eval.generate`, seed ``--seed``), or it reads an
``.npz`` sample batch (``arr_0`` uint8 NHWC and ``labels``, as ``eval.sample --out X.npz`` writes),
and prints per class the fraction whose predicted shape is the class's shape, beside the same figure
for held-out real images (the ceiling). ``--json PATH`` writes the numbers.

The classifier is trained once (seeded, under a CPU minute) and cached as ``.npz`` (no pickle)
in ``$SNGAN_CACHE_DIR`` (default ``~/.cache/sngan``) under a hash of this file's and the data
generator's source.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import time
import zipfile
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script path: import eval/ as the package, not its files
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import MissingInput, UsageError

NAME = "shape-check"
HELD_OUT = range(49000, 50000)   # real images of the ceiling (the shapes10-cnn held-out range)
TRAIN_IMAGES = 8000
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


class ShapeNet(nn.Module):
    def __init__(self, width: int = 24, num_shapes: int = 5):
        super().__init__()
        from eval.shapes_classifier import conv_body
        self.body = conv_body(1, width)   # the same body as shapes10-cnn, on one grey channel
        self.fc = nn.Linear(2 * width, num_shapes)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float ``[N, 1, 32, 32]``: luminance, each image standardised."""
    x = images.float() / 255.0
    if x.shape[-2:] != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    g = (x * _LUMA).sum(1, keepdim=True)
    mean = g.mean(dim=(2, 3), keepdim=True)
    std = g.std(dim=(2, 3), keepdim=True)
    return (g - mean) / (std + 0.02)


def jittered_shapes(n: int, seed: int) -> tuple:
    """``n`` training images (uint8 [N, 3, 32, 32]) of random shapes in random colours, and their shape ids."""
    from data_pipelines.synthetic import SHAPE_NAMES, draw
    rng = np.random.default_rng(seed)
    shapes = rng.integers(0, len(SHAPE_NAMES), n)
    size = rng.uniform(0.18, 0.40, n)
    cx, cy = (0.5 + rng.uniform(-0.16, 0.16, (2, n)))
    fg = rng.uniform(0.0, 1.0, (n, 3)) * rng.uniform(0.4, 1.0, (n, 1))
    fg[np.arange(n), rng.integers(0, 3, n)] = rng.uniform(0.5, 1.0, n)   # at least one bright channel
    r = 32
    c = (np.arange(r) + 0.5) / r - 0.5
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1))
    grad = np.cos(angle) * c.reshape(1, 1, 1, r) + np.sin(angle) * c.reshape(1, 1, r, 1)
    bg = np.clip(rng.uniform(0.0, 0.3, (n, 3, 1, 1)) + rng.uniform(0.0, 0.3, (n, 1, 1, 1)) * grad, 0, 1)
    img = draw(shapes, fg.astype(np.float32), bg.astype(np.float32), size, cx, cy, r)
    img = img + rng.normal(0.0, 1.0, (n, 1, 1, 1)) * rng.uniform(0.0, 0.04, (n, 1, 1, 1)) * rng.standard_normal(img.shape)
    return (torch.from_numpy(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)),
            torch.from_numpy(shapes.astype(np.int64)))


def train(seed: int = 0, epochs: int = 2, batch_size: int = 64, log=print) -> ShapeNet:
    t0 = time.time()
    torch.manual_seed(seed)
    net = ShapeNet()
    images, shapes = jittered_shapes(TRAIN_IMAGES, seed)
    x = to_gray(images)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(x[idx]), shapes[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    log(f"[{NAME}] trained in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return net


def _cache_path() -> str:
    from data_pipelines import synthetic
    root = os.environ.get("SNGAN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sngan")
    source = inspect.getsource(sys.modules[__name__]) + inspect.getsource(synthetic)
    return os.path.join(root, f"{NAME}-{hashlib.sha256(source.encode()).hexdigest()[:12]}.npz")


def load_shape_net(retrain: bool = False) -> ShapeNet:
    """The trained classifier, from the cache when it is there and readable."""
    path = _cache_path()
    net = ShapeNet()
    if not retrain and os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                net.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files})
            return net.eval()
        except (OSError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile) as exc:  # truncated or foreign: retrain
            print(f"[{NAME}] cached weights {path} are unreadable ({type(exc).__name__}: {exc}); retraining",
                  file=sys.stderr, flush=True)
    net = train()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in net.state_dict().items()})
    os.replace(tmp, path)
    return net


@torch.no_grad()
def predict_shapes(net: ShapeNet, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(to_gray(images[i:i + 500])).argmax(1) for i in range(0, len(images), 500)])


@torch.no_grad()
def shape_accuracy(net: ShapeNet, images: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Per shapes10 class: the fraction of its images whose predicted shape is the class's shape."""
    from data_pipelines.synthetic import SHAPES
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    pred = predict_shapes(net, images)
    want = torch.from_numpy(SHAPES)[labels.long()]
    return {int(c): float((pred[labels == c] == want[labels == c]).float().mean()) for c in labels.unique()}


def real_accuracy(net: ShapeNet, indices: Sequence[int] = HELD_OUT) -> dict[int, float]:
    from data_pipelines.synthetic import render
    images, labels = render(indices, 32, 0)
    return shape_accuracy(net, images, labels)


def _samples(path: str, per_class: int, seed: int, ema: bool | None, device: str) -> tuple:
    if path.lower().endswith(".npz"):
        if not os.path.isfile(path):
            raise MissingInput(f"{path}: no such sample batch; write one with python -m eval.sample RUN --out X.npz")
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a readable .npz sample batch ({exc})") from None
        with z:
            if "arr_0" not in z.files or "labels" not in z.files:
                raise UsageError(f"{path}: needs arr_0 (uint8 NHWC images) and labels; "
                                 f"eval.sample writes both for a conditional generator")
            images, labels = torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(z["labels"])
        if images.dtype != torch.uint8 or images.shape[1] != 3 or len(labels) != len(images):
            raise UsageError(f"{path}: arr_0 must be uint8 [N, H, W, 3] with one label per image")
        if len(labels) == 0 or labels.min() < 0 or labels.max() > 9:
            raise UsageError(f"{path}: labels must be shapes10 classes 0..9 (and at least one image)")
        return images, labels.long(), path
    from eval.generate import generate
    from eval.sample import load, make_plan, pick_device, rank_batches
    dev = pick_device(device)
    G, meta = load(path, "auto" if ema is None else ("G_ema" if ema else "G"), dev)
    num_classes = int(getattr(G, "num_classes", 0) or 0)
    if num_classes != 10:
        raise UsageError(f"{path}: the generator has {num_classes} classes; the shape check needs a shapes10 "
                         f"generator (10 classes)")
    plan = make_plan(None, num_classes, None, per_class, seed)
    images, labels = [], []
    for idx, cls, within in rank_batches(plan, 250):
        images.append(generate(G, plan, idx, cls, within, dev).cpu())
        labels.append(cls)
    return torch.cat(images), torch.cat(labels), f"{meta['path']} ({meta['which']})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.shape_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run folder, checkpoint, generator.safetensors, or an .npz sample batch")
    p.add_argument("--per-class", type=int, default=100, help="samples generated per class")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the samples (eval.generate's plan)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="score G_ema (--ema) or G (--no-ema); default: G_ema when the checkpoint has it")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p


def _main(argv=None) -> int:
    from data_pipelines.synthetic import CLASS_NAMES
    args = build_parser().parse_args(argv)
    if args.per_class < 1:
        raise UsageError(f"--per-class {args.per_class}: must be at least 1")
    images, labels, what = _samples(args.path, args.per_class, args.seed, args.ema, args.device)
    net = load_shape_net()
    gen, real = shape_accuracy(net, images, labels), real_accuracy(net)
    print(f"shape accuracy of {what}: {len(images)} images (classifier: grayscale, colour-jittered shapes)")
    print(f"{'class':>5}  {'name':<17} {'generated':>9} {'real':>6}")
    for c in sorted(gen):
        print(f"{c:>5}  {CLASS_NAMES[c]:<17} {gen[c]:>9.3f} {real[c]:>6.3f}")
    mean_gen, mean_real = float(np.mean(list(gen.values()))), float(np.mean([real[c] for c in gen]))
    print(f"{'mean':>5}  {'':<17} {mean_gen:>9.3f} {mean_real:>6.3f}   (chance 0.2; real = the ceiling)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"path": args.path, "images": len(images), "generated": {str(k): v for k, v in gen.items()},
                       "real": {str(k): v for k, v in real.items()}, "mean_generated": mean_gen,
                       "mean_real": mean_real}, f, indent=1)
    return 0


def main(argv=None) -> int:
    from eval.errors import cli
    return cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
