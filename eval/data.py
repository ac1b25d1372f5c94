"""Real images for reference statistics, read finitely and exactly once.

A *source* is a fixed, ordered list of samples; each rank reads a disjoint exact slice of it (the
training loaders are infinite resampled streams and are not used here). Specs:

- ``synthetic[:RES[:SIZE[:SEED]]]``: the embedded shapes10 dataset (defaults 32, 50000, 0), i.e.
  ``data_pipelines.synthetic.render``; the default experiment's data.
- a folder of images: ImageFolder layout (one sub-folder per class, labels in sorted order) or
  flat (no labels); files in sorted path order.
- WebDataset shards written by ``data_pipelines.prepare``: a folder holding ``*.tar`` (and usually
  ``manifest.json``), one ``.tar``, or a glob / brace pattern; samples in shard, then tar order.

``--resolution R`` resamples images that are not ``R x R`` the way the shard writer does (centre
square, Pillow antialiased bicubic); by default images are used as stored.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from trainer.errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 images, int64 labels, int64 indices


class DataError(BadInput, ValueError):
    """A data spec that names nothing readable."""


def _pil_to_uint8(img, resolution: Optional[int]) -> torch.Tensor:
    from data_pipelines.imaging import centre_square, to_rgb
    img = to_rgb(img)
    if resolution and img.size != (resolution, resolution):
        img = centre_square(img, resolution)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _stack(images: List[torch.Tensor], where: str) -> torch.Tensor:
    sizes = {tuple(x.shape) for x in images}
    if len(sizes) > 1:
        raise DataError(f"{where}: images of different sizes {sorted(sizes)[:3]}...; pass --resolution")
    return torch.stack(images)


class Source:
    """A finite, ordered list of images. Images that cannot be decoded are skipped and listed in
    ``skipped`` (``(name, error)``, this rank's), as the shard writer does."""
    num_classes = 0
    resolution = 0        # 0: unknown until images are read

    def skip(self, name: str, error: str) -> None:
        if not hasattr(self, "skipped"):
            self.skipped = []
        self.skipped.append((name, error))

    def __len__(self) -> int:
        raise NotImplementedError

    def digest(self) -> str:
        """Identity of the data (for the reference-statistics cache key)."""
        raise NotImplementedError

    def batches(self, start: int, end: int, batch_size: int, workers: int = 0) -> Iterator[Batch]:
        raise NotImplementedError


class SyntheticSource(Source):
    def __init__(self, resolution: int = 32, size: int = 50000, seed: int = 0):
        from data_pipelines import synthetic
        self._render, self.num_classes = synthetic.render, synthetic.NUM_CLASSES
        self.resolution, self.size, self.seed = resolution, size, seed
        self._code = hashlib.sha256(inspect.getsource(synthetic).encode()).hexdigest()[:16]

    def __len__(self):
        return self.size

    def digest(self):
        return f"synthetic:{self.resolution}:{self.size}:{self.seed}:{self._code}"

    def batches(self, start, end, batch_size, workers=0):
        for b in range(start, end, batch_size):
            idx = list(range(b, min(b + batch_size, end)))
            images, labels = self._render(idx, self.resolution, self.seed)
            yield images, labels, torch.tensor(idx, dtype=torch.int64)


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, files, labels, resolution):
        self.files, self.labels, self.resolution = files, labels, resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from data_pipelines.imaging import UndecodableImage, open_rgb
        try:
            with open(self.files[i], "rb") as fh:
                img, _, _ = open_rgb(fh.read())
        except (UndecodableImage, OSError) as exc:
            return None, self.files[i], str(exc)[:200]
        return _pil_to_uint8(img, self.resolution), self.labels[i], None


class FolderSource(Source):
    def __init__(self, root: str, resolution: Optional[int] = None):
        files = sorted(p for p in glob.glob(os.path.join(glob.escape(root), "**", "*"), recursive=True)
                       if p.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(p))
        if not files:
            raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        rel = [os.path.relpath(p, root) for p in files]
        tops = [r.split(os.sep)[0] if os.sep in r else None for r in rel]
        if all(t is not None for t in tops):            # ImageFolder: class = top-level folder
            classes = sorted(set(tops))
            self.labels = [classes.index(t) for t in tops]
            self.num_classes = len(classes)
        else:
            self.labels = [-1] * len(files)
        self.root, self.files, self.rel = root, files, rel
        self.resolution = resolution or 0

    def __len__(self):
        return len(self.files)

    def digest(self):
        h = hashlib.sha256()
        for r, p in zip(self.rel, self.files):
            h.update(f"{r}\0{os.path.getsize(p)}\n".encode())
        return f"folder:{h.hexdigest()}"

    def batches(self, start, end, batch_size, workers=0):
        ds = _FileDataset(self.files[start:end], self.labels[start:end], self.resolution or None)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                             collate_fn=lambda items: items)
        pos = start
        for items in loader:
            good = []
            for k, (x, y, err) in enumerate(items):
                if x is None:
                    self.skip(y, err)
                else:
                    good.append((x, y, pos + k))
            pos += len(items)
            if good:
                images = _stack([x for x, _, _ in good], self.root)
                yield (images, torch.tensor([y for _, y, _ in good], dtype=torch.int64),
                       torch.tensor([g for _, _, g in good], dtype=torch.int64))


class ShardSource(Source):
    def __init__(self, spec: str, resolution: Optional[int] = None):
        from data_pipelines import tario
        from data_pipelines.manifest import resolve_shards
        self._tario = tario
        try:
            shard_set = resolve_shards(spec)  # the loaders' own rules: manifest, brace pattern or glob
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(str(exc)) from exc
        self.shards, self.counts = shard_set.paths, shard_set.counts
        self.offsets = [0] + [int(v) for v in np.cumsum(self.counts)]
        self.num_classes = shard_set.num_classes
        self.resolution = resolution or shard_set.resolution or 0
        self._resample = resolution
        self._manifest_sha = (hashlib.sha256(json.dumps(shard_set.manifest, sort_keys=True).encode()).hexdigest()
                              if shard_set.manifest else "")

    def __len__(self):
        return int(self.offsets[-1])

    def digest(self):
        h = hashlib.sha256(self._manifest_sha.encode())
        for s, n in zip(self.shards, self.counts):
            h.update(f"{os.path.basename(s)}\0{os.path.getsize(s)}\0{n}\n".encode())
        return f"shards:{h.hexdigest()}"

    def _samples(self, start: int, end: int) -> Iterator[Tuple[torch.Tensor, int, int]]:
        from data_pipelines.imaging import UndecodableImage, open_rgb
        t = self._tario
        for k, shard in enumerate(self.shards):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            if hi <= start or lo >= end:
                continue
            buf = t.read_shard(shard)
            records = _intact_records(t, buf)   # a damaged shard: its intact part is read, the rest counted
            lost = max(0, min(hi, end) - max(lo, start, lo + len(records)))
            if lost:
                self.skip(shard, f"damaged or truncated: {lost} of its listed samples are missing")
            for i, rec in enumerate(records):
                g = lo + i
                if g >= min(hi, end):
                    break
                if g < start:
                    continue
                img = t.record_image(rec)
                if img is None:
                    self.skip(f"{shard}:{rec.key}", "no image member")
                    continue
                _, off, size = img
                try:
                    im, _, _ = open_rgb(bytes(buf[off:off + size]))
                    label = t.record_label(buf, rec)
                except (UndecodableImage, ValueError) as exc:
                    self.skip(f"{shard}:{rec.key}", str(exc)[:200])
                    continue
                yield _pil_to_uint8(im, self._resample), label, g

    def batches(self, start, end, batch_size, workers=0):
        images, labels, index = [], [], []
        for x, y, g in self._samples(start, end):
            images.append(x), labels.append(y), index.append(g)
            if len(images) == batch_size:
                yield _stack(images, self.shards[0]), torch.tensor(labels), torch.tensor(index)
                images, labels, index = [], [], []
        if images:
            yield _stack(images, self.shards[0]), torch.tensor(labels), torch.tensor(index)


def _intact_records(t, buf) -> List:
    """The records of a shard up to its first damage."""
    out = []
    try:
        for rec in t.iter_records(buf):
            out.append(rec)
    except t.ShardDamaged:
        pass
    return out


def open_source(spec: str, resolution: Optional[int] = None) -> Source:
    """A :class:`Source` for a data spec (see the module docstring)."""
    if spec.startswith("synthetic"):
        parts = spec.split(":")[1:]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise DataError(f"{spec!r}: expected synthetic[:RES[:SIZE[:SEED]]] with integers") from None
        res, size, seed = (nums + [resolution or 32, 50000, 0][len(nums):])[:3]
        return SyntheticSource(res, size, seed)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "manifest.json")) or glob.glob(os.path.join(spec, "*.tar")):
            return ShardSource(spec, resolution)
        return FolderSource(spec, resolution)
    if spec.endswith((".tar", "manifest.json")) or any(ch in spec for ch in "*?{"):
        return ShardSource(spec, resolution)
    raise DataError(f"{spec!r} is not synthetic[:RES[:SIZE[:SEED]]], an image folder or a shard set")
