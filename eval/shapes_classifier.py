"""A small classifier of the embedded shapes10 data set, registered as the extractor ``shapes10-cnn``.

The Inception network that FID/IS use runs at about one image per second on a busy 2-core CPU, so
a CPU-sized comparison (``launch.compare --quick``) cannot afford it. This is the domain-specific
alternative used for small data sets (as a LeNet for MNIST): a four-layer CNN trained once, in
about a minute of CPU, to tell the ten shapes10 classes apart. Its 64-dimensional penultimate
features, scaled so that real images have mean per-dimension variance 1, give an FID
("FID_shapes"), and its 10 logits an Inception-Score-like number (at most 10). Both measure only
the shapes domain and are comparable only with each other, never with Inception numbers.

Training is seeded and the weights are cached in ``$SNGAN_CACHE_DIR`` (default
``~/.cache/sngan``) under a hash of this file's source and the data generator's
(data_pipelines/synthetic.py), so a change of the drawing retrains it. The feature family names a hash of the
weights, so statistics of different weights (another machine's training, say) are never mixed.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from .extractors import FeatureExtractor

NAME = "shapes10-cnn"
TRAIN_IMAGES = 5000          # indices [0, 5000) of synthetic:32
HELD_OUT = range(49000, 50000)  # accuracy is measured on these


def conv_body(in_ch: int, width: int) -> nn.Sequential:
    """Four 3x3 convs with ReLU, three 2x2 max-pools and a global average: [B, 2 * width, 1, 1]."""
    return nn.Sequential(
        nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


class ShapesNet(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.body = conv_body(3, width)
        self.fc = nn.Linear(2 * width, num_classes)
        self.dim = 2 * width
        # Features are divided by this (set after training) so that real data has mean per-dimension
        # variance 1: FIDs then read in units of that variance, whatever scale training gave phi.
        self.register_buffer("feature_scale", torch.ones(()))

    def forward(self, x):
        h = self.body(x).flatten(1)
        return h / self.feature_scale, self.fc(h)


def _prepare(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 127.5 - 1.0
    if x.shape[-2:] != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    return x


def _cache_path() -> str:
    # the data it is trained on is part of the key: another drawing, other weights
    from data_pipelines import synthetic
    root = os.environ.get("SNGAN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sngan")
    source = inspect.getsource(sys.modules[__name__]) + inspect.getsource(synthetic)
    code = hashlib.sha256(source.encode()).hexdigest()[:12]
    return os.path.join(root, f"{NAME}-{code}.pt")


def train_classifier(epochs: int = 1, batch_size: int = 64, seed: int = 0, log=print) -> ShapesNet:
    """Train on the first ``TRAIN_IMAGES`` shapes10 images; print the held-out accuracy."""
    from data_pipelines.synthetic import render
    t0 = time.time()
    torch.manual_seed(seed)
    net = ShapesNet()
    images, labels = render(range(TRAIN_IMAGES), 32, 0)
    x_all = _prepare(images)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(TRAIN_IMAGES, generator=g)
        for i in range(0, TRAIN_IMAGES, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(x_all[idx])[1], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        feats = torch.cat([net(x_all[i:i + 500])[0] for i in range(0, TRAIN_IMAGES, 500)])
        net.feature_scale.copy_(feats.var(dim=0).mean().sqrt())
    acc = held_out_accuracy(net)
    log(f"[{NAME}] trained in {time.time() - t0:.0f}s; held-out accuracy {acc:.3f}")
    return net


@torch.no_grad()
def held_out_accuracy(net: ShapesNet) -> float:
    from data_pipelines.synthetic import render
    images, labels = render(HELD_OUT, 32, 0)
    return float((net(_prepare(images))[1].argmax(1) == labels).float().mean())


def load_classifier(retrain: bool = False) -> ShapesNet:
    path = _cache_path()
    net = ShapesNet()
    if not retrain and os.path.isfile(path):
        try:
            net.load_state_dict(torch.load(path, weights_only=True))
            return net.eval()
        except Exception as exc:  # truncated or foreign file: never score with it, train afresh
            print(f"[{NAME}] cached weights {path} are unreadable ({type(exc).__name__}: {exc}); retraining",
                  file=sys.stderr, flush=True)
            net = ShapesNet()
    net = train_classifier()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)
    return net


class ShapesExtractor(FeatureExtractor):
    name, num_logits = NAME, 10

    def __init__(self, device):
        super().__init__()
        self.net = load_classifier().to(device)
        self.dim = self.net.dim
        digest = hashlib.sha256()
        for key, value in sorted(self.net.state_dict().items()):
            digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
        self.family = f"{NAME}/{digest.hexdigest()[:12]}"

    def forward(self, images):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        feats, logits = self.net(_prepare(images.to(next(self.net.parameters()).device)))
        return feats.float(), logits.float()

