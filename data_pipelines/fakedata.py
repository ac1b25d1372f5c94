"""Small datasets in the real on-disk formats, for tests and benchmarks (no download needed).

* :func:`make_imagenet` -- ``train/<wnid>/<wnid>_<n>.JPEG`` with the oddities of the real thing
  (a grayscale JPEG, a CMYK JPEG, a PNG named ``.JPEG``) and optionally a corrupt file; a flat
  ``val/`` folder with ``LOC_val_solution.csv`` (Kaggle) or a devkit ground-truth list + meta.mat.
* :func:`make_cifar10` -- ``cifar-10-batches-py`` pickles as torchvision downloads them.
* :func:`make_stl10` -- ``stl10_binary/*.bin`` (uint8, 3x96x96 column-major, labels 1..10).

Images are smooth colour fields with a per-image pattern, so JPEG keeps them close to the source
and two different images are never within JPEG tolerance of each other.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from .imagenet_classes import ILSVRC2012_WNIDS


def pattern(index: int, height: int, width: int) -> np.ndarray:
    """A smooth, image-specific uint8 HWC RGB picture."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / max(height - 1, 1), xx / max(width - 1, 1)
    base = rng.uniform(40, 215, 3)
    fx, fy, ph = rng.uniform(0.5, 2.5, 3), rng.uniform(0.5, 2.5, 3), rng.uniform(0, 6.3, 3)
    out = np.empty((height, width, 3), np.float32)
    for c in range(3):
        out[..., c] = base[c] + 38 * np.sin(6.283 * (fx[c] * xx + fy[c] * yy) + ph[c])
    return out.clip(0, 255).astype(np.uint8)


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


def make_imagenet(root: str | Path, classes: Sequence[int] = (0, 1, 2), per_class: int = 4,
                  size: Tuple[int, int] = (60, 80), oddities: bool = True, corrupt: bool = False,
                  val_per_class: int = 0, val_labels: str = "kaggle") -> Dict[str, List[str]]:
    """An ImageNet-like tree under ``root``; returns ``{"train": [paths], "val": [paths]}`` sorted.

    ``classes`` are ILSVRC-2012 indices. With ``oddities`` the first class gets a grayscale JPEG, the
    second a CMYK JPEG and the third a PNG named ``.JPEG`` (as n02105855_2933.JPEG in the real set).
    ``corrupt`` adds one truncated JPEG to the first class.
    """
    root = Path(root)
    h, w = size
    made: Dict[str, List[str]] = {"train": [], "val": []}
    counter = 0
    for ci, cls in enumerate(classes):
        wnid = ILSVRC2012_WNIDS[cls]
        for j in range(per_class):
            counter += 1
            # Vary the shape so resizing is exercised: landscape, portrait, square.
            hh, ww = [(h, w), (w, h), (h, h)][j % 3]
            img = Image.fromarray(pattern(cls * 1000 + j, hh, ww))
            path = root / "train" / wnid / f"{wnid}_{j}.JPEG"
            fmt, kw = "JPEG", {"quality": 95}
            if oddities and j == 0 and ci == 0:
                img = img.convert("L")
            elif oddities and j == 0 and ci == 1:
                img = img.convert("CMYK")
            elif oddities and j == 0 and ci == 2:
                fmt, kw = "PNG", {}
            _save(img, path, fmt, **kw)
            made["train"].append(str(path))
        if corrupt and ci == 0:
            good = (root / "train" / wnid / f"{wnid}_1.JPEG").read_bytes()
            bad = root / "train" / wnid / f"{wnid}_999.JPEG"
            bad.write_bytes(good[: len(good) // 3])
            made["train"].append(str(bad))
    if val_per_class:
        rows, gt = [], []
        n = 0
        for cls in classes:
            for _j in range(val_per_class):
                n += 1
                stem = f"ILSVRC2012_val_{n:08d}"
                _save(Image.fromarray(pattern(500_000 + n, h, w)), root / "val" / f"{stem}.JPEG", "JPEG", quality=95)
                made["val"].append(str(root / "val" / f"{stem}.JPEG"))
                rows.append(f"{stem},{ILSVRC2012_WNIDS[cls]} 1 2 30 40 {ILSVRC2012_WNIDS[cls]} 5 6 20 30")
                gt.append(cls)
        if val_labels == "kaggle":
            (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
        else:
            _write_devkit(root / "ILSVRC2012_devkit_t12" / "data", gt)
    made = {k: sorted(v) for k, v in made.items()}
    return made


def _write_devkit(folder: Path, standard_indices: List[int]) -> None:
    """ground truth + meta.mat. Devkit ids differ from the sorted order; here id = 1000 - index."""
    from scipy.io import savemat
    folder.mkdir(parents=True, exist_ok=True)
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O")]
    synsets = np.array([(1000 - i, w, w) for i, w in enumerate(ILSVRC2012_WNIDS)], dtype=dtype)
    savemat(folder / "meta.mat", {"synsets": synsets})
    (folder / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "\n".join(str(1000 - i) for i in standard_indices) + "\n")


def make_imagefolder(root: str | Path, class_names: Sequence[str] = ("cat", "dog"), per_class: int = 3,
                     size: int = 32) -> List[str]:
    root = Path(root)
    paths = []
    for ci, name in enumerate(class_names):
        for j in range(per_class):
            p = root / name / f"{j:04d}.jpg"
            _save(Image.fromarray(pattern(7000 + ci * 100 + j, size, size)), p, "JPEG", quality=95)
            paths.append(str(p))
    return sorted(paths)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(root: str | Path, per_batch: int = 20, batches: int = 5, test: int = 10) -> Path:
    """``root/cifar-10-batches-py`` with ``batches`` train pickles (the real set has 5 x 10000)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    n = 0

    def batch(count: int, name: str) -> None:
        nonlocal n
        imgs = np.stack([pattern(90_000 + n + i, 32, 32) for i in range(count)])
        labels = [(n + i) % 10 for i in range(count)]
        n += count
        data = imgs.transpose(0, 3, 1, 2).reshape(count, 3072)  # R plane, G plane, B plane, row-major
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(count)]}, f)

    for b in range(1, batches + 1):
        batch(per_batch, f"data_batch_{b}")
    batch(test, "test_batch")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [s.encode() for s in CIFAR10_NAMES], b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f)
    return folder


def make_stl10(root: str | Path, train: int = 12, test: int = 6, unlabeled: int = 8) -> Path:
    """``root/stl10_binary`` with the official byte layout (each image C, then W, then H)."""
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    offset = 0
    for split, count in (("train", train), ("test", test), ("unlabeled", unlabeled)):
        hwc = np.stack([pattern(300_000 + offset + i, 96, 96) for i in range(count)])
        (folder / f"{split}_X.bin").write_bytes(hwc.transpose(0, 3, 2, 1).tobytes())
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(bytes([(offset + i) % 10 + 1 for i in range(count)]))
        offset += count
    (folder / "class_names.txt").write_text("\n".join(
        ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n")
    return folder
