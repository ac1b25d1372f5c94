"""``data.backend=ffcv``: the training stream over an FFCV ``.beton`` (optional extra), and its writer.

ffcv is optional: this module imports without it; :func:`require_ffcv` raises an ImportError that
names the install commands when the backend is chosen or ``--format ffcv`` is asked for.

Order. Epoch ``e`` is ``permutation(N)`` seeded by ``(seed, e)``; rank ``r`` of ``w`` takes
positions ``r, r + w, ...`` (global rank), cut to whole batches. FFCV's own ``distributed=True``
asks torch.distributed for the rank and replays the epoch on a restart, so the order is given to
the FFCV loader here instead. The position is the number of batches this rank consumed, which
makes resume exact (same world size, batch size, seed and file). Up to ``w x batch - 1`` samples
are left out of each epoch, a different random set every epoch.

Decoding runs in FFCV's compiled pipeline with ``data.num_workers`` threads: JPEG decode, then a
centre crop (or a random crop of ``data.random_crop_ratio``) resized to ``data.resolution`` when
the stored images differ from it, then an optional flip. FFCV cannot skip a corrupt sample: the
writer only stores images it decoded, and ``stream.skipped`` stays 0.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import time
import types
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from .config import DataConfig
from .manifest import MANIFEST_NAME, read_manifest
from .stream import register_backend
from .tario import COL_LABEL, COL_OFFSET, COL_SIZE, read_shard, load_index, sha256_file
from .errors import DataInputError, DataMissing

INSTALL_HINT = ("apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && pip install -e '.[ffcv]' "
                "(or run tests/install_ffcv.sh)")


def require_ffcv():
    """The ffcv module, or an ImportError saying how to install it."""
    try:
        import ffcv
        from ffcv.loader import Loader  # noqa: F401  (compiled extension: fails if libs are missing)
    except ImportError as exc:
        raise ImportError(f"data.backend=ffcv / --format ffcv needs the optional package ffcv ({exc}). "
                          f"Install: {INSTALL_HINT}") from None
    return ffcv


# ----------------------------------------------------------------------------------------------
# writer: staged WebDataset shards -> data.beton, JPEG bytes stored unchanged


class _ShardSamples:
    """Indexable view of the samples of finished shards: (jpeg bytes as uint8 array, label)."""

    def __init__(self, shards: List[Path]):
        rows = []
        for k, path in enumerate(shards):
            index, damage = load_index(path, read_shard(path))
            if damage:
                raise RuntimeError(f"staged shard {path} is damaged: {damage}")
            rows.append(np.column_stack([np.full(len(index), k), index[:, [COL_OFFSET, COL_SIZE, COL_LABEL]]]))
        self.shards = [str(p) for p in shards]
        self.rows = np.concatenate(rows) if rows else np.zeros((0, 4), np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        shard, offset, size, label = (int(x) for x in self.rows[i])
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return np.frombuffer(data, dtype=np.uint8), label


def _encode_stored_jpeg(self, destination, jpeg: np.ndarray, malloc) -> None:
    """RGBImageField.encode for bytes that already are a JPEG: store them, do not re-encode."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from PIL import Image
    with Image.open(io.BytesIO(jpeg.tobytes())) as img:
        width, height = img.size
    destination["mode"] = IMAGE_MODES["jpg"]
    destination["height"], destination["width"] = height, width
    destination["data_ptr"], storage = malloc(jpeg.nbytes)
    storage[:] = jpeg


def write_beton(shards: List[Path], out: Path, workers: int = 1) -> dict:
    """Copy the samples of ``shards`` (in order) into an FFCV file at ``out`` (atomic rename)."""
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    samples = _ShardSamples(shards)
    image_field = RGBImageField(write_mode="jpg")
    if mp.get_start_method(allow_none=True) in (None, "fork"):
        # FFCV's writer processes are forked and inherit this bound method; under spawn they would
        # not, so there the images are decoded and FFCV re-encodes them (a second JPEG pass).
        image_field.encode = types.MethodType(_encode_stored_jpeg, image_field)
    else:  # pragma: no cover - non-Linux start methods
        samples = _DecodedSamples(samples)
    tmp = out.with_name(out.name + ".partial")
    start = time.perf_counter()
    writer = DatasetWriter(str(tmp), {"image": image_field, "label": IntField()}, num_workers=max(1, workers))
    writer.from_indexed_dataset(samples, chunksize=256)
    tmp.replace(out)
    return {"name": out.name, "samples": len(samples), "bytes": out.stat().st_size, "sha256": sha256_file(out),
            "seconds": round(time.perf_counter() - start, 3)}


class _DecodedSamples:  # pragma: no cover - used only where processes are not forked
    def __init__(self, base: _ShardSamples):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        from PIL import Image
        data, label = self.base[i]
        return np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB")), label


# ----------------------------------------------------------------------------------------------
# loader


def _resolve_beton(path: str) -> Tuple[Path, Optional[dict]]:
    if not path:
        raise DataInputError("data.path is empty; set it to a folder written with --format ffcv or a .beton file")
    p = Path(path).expanduser()
    manifest_file = p / MANIFEST_NAME if p.is_dir() else p.with_name(MANIFEST_NAME)
    manifest = read_manifest(manifest_file) if manifest_file.is_file() else None
    if p.is_dir():
        if manifest is None or manifest.get("format") != "ffcv":
            raise DataInputError(f"data.path {path!r} has no manifest of an FFCV dataset; point it to the folder "
                             f"written with --format ffcv or to a .beton file")
        p = p / manifest["beton"]["name"]
    elif manifest is not None and manifest.get("format") != "ffcv":
        manifest = None  # a manifest of something else beside the file
    if not p.is_file():
        raise DataMissing(f"FFCV file {str(p)!r} does not exist")
    return p, manifest


class _GivenOrder:
    """An FFCV traversal order that returns the order this stream computed for the epoch."""

    def __init__(self, stream: "FFCVStream"):
        self.stream = stream

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.stream._rank_order(epoch)


class FFCVStream:
    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world_size: int, seed: int,
                 start_batch: int = 0):
        require_ffcv()
        from ffcv.reader import Reader
        if not 0.0 < cfg.random_crop_ratio <= 1.0:
            raise DataInputError(f"data.random_crop_ratio={cfg.random_crop_ratio} must be in (0, 1]")
        self.cfg, self.batch_size, self.rank, self.world_size, self.seed = cfg, batch_size, rank, world_size, seed
        self.beton, manifest = _resolve_beton(cfg.path)
        reader = Reader(str(self.beton))
        self.num_samples = int(reader.num_samples)
        if manifest is not None:
            self.num_classes, self.stored_resolution = int(manifest["num_classes"]), manifest.get("resolution")
        else:  # a bare .beton: labels are in the metadata, no need to decode anything
            self.num_classes, self.stored_resolution = int(reader.metadata["f1"].max()) + 1, None
        self.resolution = cfg.resolution
        self.batches_per_epoch = (self.num_samples // world_size) // batch_size
        if self.batches_per_epoch < 1:
            raise DataInputError(f"{self.num_samples} samples give {self.num_samples // world_size} per rank for "
                             f"{world_size} ranks, fewer than one batch of {batch_size}")
        self.position = start_batch
        self.skipped = 0  # FFCV has no way to skip a sample; kept for the common stream interface
        self._skip_in_epoch = 0

    def _rank_order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch, 0xFFC]).permutation(self.num_samples)
        order = perm[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]
        skip, self._skip_in_epoch = self._skip_in_epoch * self.batch_size, 0
        return order[skip:].astype(np.uint64)

    def _pipelines(self) -> dict:
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                           SimpleRGBImageDecoder)
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage
        r, c = self.resolution, self.cfg.random_crop_ratio
        if c < 1.0:
            decoder = RandomResizedCropRGBImageDecoder((r, r), scale=(c * c, c * c), ratio=(1.0, 1.0))
        elif self.stored_resolution == r:
            decoder = SimpleRGBImageDecoder()
        else:
            decoder = CenterCropRGBImageDecoder((r, r), ratio=1.0)
        image = [decoder] + ([RandomHorizontalFlip()] if self.cfg.random_flip else []) + [ToTensor(), ToTorchImage()]
        return {"image": image, "label": [IntDecoder(), ToTensor(), Squeeze()]}

    def _loader(self):
        from ffcv.loader import Loader, OrderOption
        loader = Loader(str(self.beton), batch_size=self.batch_size, num_workers=max(1, self.cfg.num_workers),
                        order=OrderOption.SEQUENTIAL, pipelines=self._pipelines(), drop_last=True,
                        os_cache=True, seed=self.seed)
        # FFCV 1.0 has no public hook for a caller-given order; these three attributes are how its
        # Loader consumes one (traversal_order.sample_order(epoch), its length, the epoch counter).
        loader.traversal_order = _GivenOrder(self)
        loader.first_traversal_order = np.zeros(self.batches_per_epoch * self.batch_size, np.uint64)
        return loader

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        loader = self._loader()
        while True:
            epoch, self._skip_in_epoch = divmod(self.position, self.batches_per_epoch)
            loader.next_epoch = epoch
            for images, labels in loader:
                self.position += 1
                # FFCV reuses its output buffers a few batches later: hand out our own copy.
                yield (images.clone(memory_format=torch.contiguous_format),
                       labels.reshape(-1).to(torch.int64, copy=True))

    def state_dict(self) -> dict:
        return {"batches": self.position, "skipped": 0}


@register_backend("ffcv")
def build_ffcv(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
               start_batch: int = 0) -> FFCVStream:
    return FFCVStream(cfg, batch_size, rank, world_size, seed, start_batch)
