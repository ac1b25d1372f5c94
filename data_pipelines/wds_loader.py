"""``data.backend=webdataset``: an infinite, deterministic, resumable per-rank stream over tar shards.

Who reads what. A rank runs ``W = max(1, data.num_workers)`` loader workers; reader *slot*
``s = rank * W + worker`` is one of ``S = world_size * W``. In epoch ``e`` the shards, each cut into
``P = ceil(S / n_shards)`` interleaved parts (sample ``i`` of a shard is in part ``i % P``; ``P = 1``
unless there are fewer shards than slots), are permuted with ``(seed, e)`` and slot ``s`` takes
every ``S``-th part starting at ``s``. So within an epoch every sample is read by exactly one slot,
and fewer shards than ranks x workers still works (each such shard is read by several slots, each
keeping its own samples). A slot's samples pass through a shuffle buffer of ``data.shuffle_buffer``
seeded by ``(seed, e, s)``; the buffer is flushed at the end of the slot's epoch, so epochs do not
mix. The slot then goes on with epoch ``e + 1``: the stream is infinite and never ends an epoch
early or pads it. Everything is a pure function of ``(seed, rank, worker, world_size, W, shards)``.

Batches. Each worker yields whole batches of its own samples (``WorkerBatch``); the DataLoader takes them round
robin, so batch ``j`` of the rank comes from worker ``j % W``.

Resume. ``start_batch`` (batches this rank consumed) tells worker ``w`` that it produced
``ceil((start_batch - w) / W)`` batches, i.e. a known number of *records*. Whole epochs are skipped
by arithmetic from the per-shard counts of the manifest; inside the current epoch the worker reads
(but does not decode) the records it already produced. With the same world size, workers, batch
size, seed and shards the resumed stream is exactly the continuation of the interrupted one.
Corrupt records do not consume a batch slot, so each corrupt record before the resume point in
the current epoch shifts the resumed stream back by one record (counted in the logs); a shard that
was truncated after the manifest was written shifts it by its missing records. With a different
world size or worker count the position is mapped to the same epoch and fraction of it under the
new layout: no sample is seen twice in a row because of the resume, and the start of the epoch is
not replayed.

Corrupt data. An image that fails to decode or a record without image/label is skipped, counted
and warned about (first few per worker, then every 1000th); a truncated or damaged shard ends at
its last intact record. ``stream.skipped`` is the rank's running total, including all workers.

Remote shards (``data.path`` a URL pattern or ``pipe:`` command, :mod:`.remote`). Everything above
holds unchanged: the per-shard counts come from the manifest.json beside the shards or from
counting them once at start-up, and a slot streams each of its units through ``webdataset.gopen``,
parsing the tar as it arrives (:func:`.tario.stream_samples`) instead of reading the shard and its
index; the records then carry their own bytes. Skipping records on resume still skips decoding,
but the records before the resume point in the current epoch are streamed again.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from .config import DataConfig
from .errors import DataInputError
from .manifest import ShardSet, resolve_shards
from .stream import register_backend
from .tario import BAD_LABEL, COL_LABEL, COL_OFFSET, ShardDamaged, key_at, load_index, read_shard

log = logging.getLogger("data_pipelines.wds")
_JPEG_EXTS = ("img.jpg", "jpg", "jpeg")
PREFETCH = 4      # batches each loader worker may have ready ahead of the training loop
_RING_EXTRA = 2   # shared-memory batch buffers per worker beyond PREFETCH


def jpeg_decoder() -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision.io's libjpeg-turbo decoder (bytes tensor -> uint8 RGB [3,H,W]), called as its
    registered op where possible: the Python wrapper adds a usage log and a deprecation warning per
    call, ~8 us, a fifth of decoding a 32 px image."""
    op = getattr(getattr(torch.ops, "image", None), "decode_jpeg", None)
    if op is not None:
        return functools.partial(op, mode=ImageReadMode.RGB.value, apply_exif_orientation=False)
    return _decode_any  # pragma: no cover - torchvision without the op


def _decode_any(data: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(data, mode=ImageReadMode.RGB)


class SlotPlan:
    """Which samples each reader slot reads in each epoch (see module docstring)."""

    def __init__(self, counts: List[int], n_slots: int, seed: int):
        total = sum(counts)
        if total < n_slots:
            raise DataInputError(f"{total} samples cannot feed {n_slots} readers (ranks x workers); "
                             f"use fewer loader workers (data.num_workers) or more data")
        self.counts, self.n_slots, self.seed = list(counts), n_slots, seed
        self.parts = max(1, math.ceil(n_slots / len(counts)))
        self.units = [(shard, part) for shard in range(len(counts)) for part in range(self.parts)]
        self.unit_counts = [len(range(part, counts[shard], self.parts)) for shard, part in self.units]

    def slot_units(self, epoch: int, slot: int) -> List[Tuple[int, int]]:
        perm = np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(len(self.units))
        return [self.units[i] for i in perm[slot::self.n_slots]]

    def slot_count(self, epoch: int, slot: int) -> int:
        perm = np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(len(self.units))
        return int(sum(self.unit_counts[i] for i in perm[slot::self.n_slots]))

    def locate(self, slot: int, records: int) -> Tuple[int, int]:
        """(epoch, records into that epoch) after ``records`` records of ``slot``'s stream."""
        epoch = 0
        while True:
            n = self.slot_count(epoch, slot)
            if records < n:
                return epoch, records
            records -= n
            epoch += 1


def _mix(*numbers: int) -> int:
    """A seed from several integers, the same in every process and Python version."""
    return int(np.random.SeedSequence([int(n) & 0xFFFFFFFFFFFF for n in numbers]).generate_state(1)[0])


_M64 = (1 << 64) - 1


def uniform(key: int, i: int) -> float:
    """The ``i``-th number in [0, 1) of the sequence ``key`` (splitmix64): random access, so the
    augmentation of a sample depends only on its position in the stream, also after a resume."""
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return ((z ^ (z >> 31)) >> 11) * (1.0 / (1 << 53))


def fit_square(img: torch.Tensor, resolution: int, crop_ratio: float = 1.0,
               crop_at: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """uint8 [3,H,W] -> [3,R,R]: the centre square, or with ``crop_ratio < 1`` a square of that
    fraction of the short side at relative position ``crop_at`` (two numbers in [0, 1)) as in the
    projection paper's augmentation, resized with antialias."""
    _, h, w = img.shape
    short = min(h, w)
    if crop_ratio < 1.0 and crop_at is not None:
        # The official offsets: randint(0, h - side - 1) (sngan_projection
        # datasets/imagenet_dog_and_cat.py:29-33), i.e. h - side positions (one when h == side).
        side = max(1, int(short * crop_ratio))
        top, left = int(crop_at[0] * max(1, h - side)), int(crop_at[1] * max(1, w - side))
    else:
        side = short
        top, left = (h - side) // 2, (w - side) // 2
    img = img[:, top:top + side, left:left + side]
    if side != resolution:
        img = TF.resize(img, [resolution, resolution], antialias=True)
    return img


def probe_short_side(shard: str, samples: int = 8, remote: bool = False) -> Optional[int]:
    """The largest short side among the first ``samples`` images of a shard (None if unreadable)."""
    from .imaging import jpeg_size
    if remote:
        from .remote import first_images
        images = first_images(shard, samples)
    else:
        try:
            buf = read_shard(shard)
            index, _ = load_index(shard, buf)
        except (OSError, ValueError):
            return None
        images = [bytes(buf[offset:offset + size]) for offset, size, _label, _jpeg in index[:samples].tolist()]
    sides = []
    for image in images:
        try:
            sides.append(min(jpeg_size(image)))
        except Exception:
            continue
    return max(sides) if sides else None


class DataUnreadable(DataInputError):
    """A reader found no readable sample at all (every shard it was given is damaged)."""


class _Warner:
    """Counts skipped samples. A sample that fails to decode is reported for the first five, then
    every 1000th; a shard that loses samples (unreadable, damaged, labels out of range) is reported
    every time, with the count."""

    def __init__(self, where: str):
        self.where, self.count = where, 0

    def __call__(self, message: str, n: int = 1) -> None:
        before, self.count = self.count, self.count + n
        if self.count <= 5 or self.count // 1000 > before // 1000:
            log.warning("%s: %s (%d skipped so far)", self.where, message, self.count)

    def shard(self, message: str, n: int) -> None:
        self.count += n
        log.warning("%s: %s (%d skipped so far)", self.where, message, self.count)


@dataclass
class WorkerBatch:
    """One batch from a :class:`ShardStream` worker to :class:`WebDatasetStream` (pickled across the
    DataLoader's process boundary; a few fields per batch, not per image)."""
    images: Optional[torch.Tensor]    # uint8 [B, 3, R, R]; None: already sent, in ring buffer ``ring_index``
    labels: np.ndarray                # int64 [B] (numpy: pickled by value, no shared-memory segment)
    skipped: int                      # samples this worker has skipped so far
    ring_index: int = -1              # >= 0: the worker's shared-memory ring buffer that holds ``images``
    keys: Optional[List[str]] = None  # the samples' keys (single-epoch mode: tests, tools)


class ShardStream(IterableDataset):
    """One rank's reader; runs inside each DataLoader worker (or in-process for num_workers=0)."""

    def __init__(self, shards: ShardSet, cfg: DataConfig, batch_size: int, rank: int, world_size: int,
                 seed: int, start_batch: int = 0, epoch: Optional[int] = None):
        self.paths, self.batch_size, self.rank, self.seed = shards.paths, batch_size, rank, seed
        self.remote = shards.remote  # URLs / pipe: commands: streamed, parsed as they arrive
        self.workers = max(1, cfg.num_workers)
        self.plan = SlotPlan(shards.counts, world_size * self.workers, seed)
        self.resolution, self.flip = cfg.resolution, cfg.random_flip
        self.crop_ratio = cfg.random_crop_ratio
        self.stored_resolution = shards.resolution
        self.shuffle_buffer = max(1, cfg.shuffle_buffer)
        self.start_batch = start_batch
        self.single_epoch = epoch  # set: yield that epoch only, last batch partial, with keys (tests, tools)
        self.num_classes = shards.num_classes  # labels outside [0, num_classes) are skipped (0: unlabelled)

    # -- records ------------------------------------------------------------------------------
    # A record is a tuple (buffer, image offset, image size, label, is_jpeg, shard index): the buffer
    # is the whole shard for a local file, the sample's own bytes (headers + data) for a streamed one.

    def _unit_records(self, shard: int, part: int, warn: _Warner):
        """The records of one part of one shard, in shard order."""
        if self.remote:
            return self._streamed_records(shard, part, warn)
        buf, rows = self._unit_rows(shard, part, warn)
        return [(buf, offset, size, label, is_jpeg, shard) for offset, size, label, is_jpeg in rows]

    def _streamed_records(self, shard: int, part: int, warn: _Warner) -> Iterator[tuple]:
        """A remote shard's records of this part as its tar stream arrives: sample ``i`` of the
        shard belongs to part ``i % parts`` as in :meth:`_unit_rows`, so a shard read by several
        slots is streamed by each, each keeping its own samples. Damage, a failed transfer and
        labels out of range are reported as for local shards, once the stream has ended."""
        from .remote import transfer_error, url_samples
        url, parts, num_classes = self.paths[shard], self.plan.parts, self.num_classes
        expected = len(range(part, self.plan.counts[shard], parts))
        got, damage, failed, bad = 0, None, None, []
        samples = url_samples(url)
        try:
            for i, (sample, (offset, size, label, is_jpeg)) in enumerate(samples):
                if i % parts != part:
                    continue
                got += 1
                if num_classes > 0 and label != BAD_LABEL and not 0 <= label < num_classes:
                    bad.append((key_at(sample, offset) if size > 0 else "?", label))
                    continue
                yield sample, offset, size, label, is_jpeg, shard
        except ShardDamaged as exc:
            damage = str(exc)
        except (OSError, ValueError) as exc:  # the reader (curl, the pipe: command) failed
            failed = transfer_error(exc)
        finally:
            samples.close()
        if failed is not None and got == 0:
            warn.shard(f"cannot read shard {url}: {failed}; its {expected} samples for this reader are skipped",
                       max(1, expected))
        elif damage is not None or failed is not None or got < expected:
            why = damage or (failed and f"transfer failed: {failed}") or "fewer samples than the manifest"
            warn.shard(f"shard {url} is damaged ({why}); {got} of its {expected} samples for this reader are "
                       f"readable", max(1, expected - got))
        if bad:
            warn.shard(f"shard {url}: {len(bad)} samples with labels outside [0, {num_classes}) skipped, e.g. "
                       f"{', '.join(k for k, _ in bad[:3])} (label {bad[0][1]})", len(bad))

    def _unit_rows(self, shard: int, part: int, warn: _Warner) -> Tuple[Optional[bytearray], list]:
        """(shard bytes, index rows of this part) -- rows are (offset, size, label, is_jpeg)."""
        path, parts = self.paths[shard], self.plan.parts
        expected = len(range(part, self.plan.counts[shard], parts))
        try:
            buf = read_shard(path)
        except OSError as exc:
            warn.shard(f"cannot read shard {path}: {exc}; its {expected} samples for this reader are skipped",
                       max(1, expected))
            return None, []
        index, damage = load_index(path, buf)
        part_index = index[part::parts]
        if damage is not None or len(part_index) < expected:
            warn.shard(f"shard {path} is damaged ({damage or 'fewer samples than the manifest'}); "
                       f"{len(part_index)} of its {expected} samples for this reader are readable",
                       max(1, expected - len(part_index)))
        if self.num_classes > 0 and len(part_index):
            labels = part_index[:, COL_LABEL]
            bad = (labels != BAD_LABEL) & ((labels < 0) | (labels >= self.num_classes))
            if bad.any():
                keys = [key_at(buf, int(o)) for o in part_index[bad][:3, COL_OFFSET]]
                warn.shard(f"shard {path}: {int(bad.sum())} samples with labels outside [0, {self.num_classes}) "
                           f"skipped, e.g. {', '.join(keys)} (label {int(labels[bad][0])})", int(bad.sum()))
                part_index = part_index[~bad]
        return buf, part_index.tolist()

    def _slot_stream(self, slot: int, skip: int, warn: _Warner) -> Iterator[tuple]:
        """Records ``(bytes, offset, size, label, is_jpeg, shard)`` of this slot forever (or for
        ``single_epoch``), after dropping the first ``skip`` without decoding them.

        One generator holds the epoch loop and the shuffle buffer (a reservoir of ``shuffle_buffer``
        records; each new record evicts a random one, the rest is shuffled out at the end of the
        epoch): every extra generator level costs ~0.5 us per image.
        """
        if self.single_epoch is not None:
            epoch, skip = self.single_epoch, 0
        else:
            epoch, skip = self.plan.locate(slot, skip)
        size, empty = self.shuffle_buffer, 0
        while True:
            rng = random.Random(_mix(self.seed, epoch, slot, 0x5F1))
            rand, pool, n = rng.random, [], 0
            for shard, part in self.plan.slot_units(epoch, slot):
                for record in self._unit_records(shard, part, warn):
                    if len(pool) < size:
                        pool.append(record)
                        continue
                    j = int(rand() * size)
                    pool[j], record = record, pool[j]
                    n += 1
                    if n > skip:
                        yield record
            rng.shuffle(pool)
            for record in pool:
                n += 1
                if n > skip:
                    yield record
            skip = 0
            if self.single_epoch is not None:
                return
            empty = 0 if n else empty + 1
            if empty >= 3:
                raise DataUnreadable(f"no readable sample in {len(self.paths)} shards ({self.paths[0]} ...) "
                                     f"after 3 passes: every shard this reader was given is damaged or empty; "
                                     f"check them with `python -m data_pipelines.verify`")
            epoch += 1

    # -- batches ------------------------------------------------------------------------------

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)  # one core per worker; decode is single-threaded anyway
            if info.num_workers != self.workers:
                raise RuntimeError(f"ShardStream built for {self.workers} workers runs in {info.num_workers}")
        self._ring, self._ring_next = None, 0
        if info is not None and self.single_epoch is None:
            # Batches go to the training process through shared memory. A fresh segment per batch
            # costs ~50 us per 128 px image in page faults (a third of decoding it), and passing its
            # file descriptor ~3 ms per batch; so a worker stacks into a ring of segments, each
            # sent once and afterwards named by its ring index (WebDatasetStream keeps the
            # mappings). The DataLoader lets a worker run at most PREFETCH batches ahead of what
            # the training process has taken, and the stream copies each batch when it takes it,
            # so a buffer is free again after PREFETCH + 1 batches; the ring has PREFETCH + _RING_EXTRA.
            self._ring = [torch.empty((self.batch_size, 3, self.resolution, self.resolution),
                                      dtype=torch.uint8).share_memory_() for _ in range(PREFETCH + _RING_EXTRA)]
        sent: set = set()
        # The DataLoader always starts with its worker 0, but after start_batch batches the next one
        # is due from worker start_batch % W: loader worker i plays the role of worker i + start_batch.
        worker = ((info.id if info is not None else 0) + self.start_batch) % self.workers
        slot = self.rank * self.workers + worker
        warn = _Warner(f"webdataset rank {self.rank} worker {worker}")
        # Worker w produced batches w, w+W, ... of the rank's first start_batch batches.
        produced = max(0, -(-(self.start_batch - worker) // self.workers))
        records = self._slot_stream(slot, produced * self.batch_size, warn)
        # Position of the next record in this slot's stream; augmentation draws are a function of it.
        position, aug_key = produced * self.batch_size, _mix(self.seed, slot, 0xA06)
        with_keys = self.single_epoch is not None
        # The loop below runs once per image: names are bound locally (it is ~20% faster).
        decode_jpeg, frombuffer, uint8 = jpeg_decoder(), torch.frombuffer, torch.uint8
        shape = (3, self.resolution, self.resolution)
        always_fit, flip, crop, batch_size = self.crop_ratio < 1.0, self.flip, self.crop_ratio, self.batch_size
        # Shards written at the training resolution are trusted to hold that size (a stray one is
        # caught when the batch is stacked); checking every image costs ~0.5 us.
        check_shape, bad_label = self.stored_resolution != self.resolution, BAD_LABEL
        while True:
            images, labels, keys = [], [], []
            for buf, offset, size, label, is_jpeg, shard in records:
                position += 1
                try:
                    if size <= 0 or label == bad_label:
                        raise ValueError("record without an image or a readable label")
                    data = frombuffer(buf, dtype=uint8, count=size, offset=offset)
                    img = decode_jpeg(data) if is_jpeg else _decode_any(data)
                    if always_fit or (check_shape and img.shape != shape):
                        img = fit_square(img, self.resolution, crop, (uniform(aug_key, 3 * position),
                                                                      uniform(aug_key, 3 * position + 1)))
                except (RuntimeError, ValueError) as exc:
                    where = key_at(buf, offset) if size > 0 else "?"
                    warn(f"skipping sample {where} of {self.paths[shard]}: {str(exc).splitlines()[0][:200]}")
                    continue
                images.append(img.flip(-1) if flip and uniform(aug_key, 3 * position + 2) < 0.5 else img)
                labels.append(label)
                if with_keys:
                    keys.append(key_at(buf, offset))
                if len(images) == batch_size:
                    break
            if len(images) < batch_size:  # only in single-epoch mode: the stream ended
                if images:
                    yield WorkerBatch(self._stack(images), np.asarray(labels, dtype=np.int64), warn.count, keys=keys)
                return
            # Labels travel as a numpy array: pickled by value, whereas a tensor would get its own
            # shared-memory segment (~0.3 ms per batch for 2 KB).
            labels = np.asarray(labels, dtype=np.int64)
            if with_keys:
                yield WorkerBatch(self._stack(images), labels, warn.count, keys=keys)
            elif self._ring is None:
                yield WorkerBatch(self._stack(images), labels, warn.count)
            else:
                ring_index = self._ring_next
                batch = self._stack(images)
                yield WorkerBatch(None if ring_index in sent else batch, labels, warn.count, ring_index=ring_index)
                sent.add(ring_index)


    def _stack(self, images: List[torch.Tensor]) -> torch.Tensor:
        if len(images) < self.batch_size or self._ring is None:
            out = None
        else:  # a worker: the next buffer of its shared-memory ring (see _RING_EXTRA)
            out, self._ring_next = self._ring[self._ring_next], (self._ring_next + 1) % len(self._ring)
        try:
            return torch.stack(images, out=out)
        except RuntimeError:  # an image of another size in shards that claim one resolution
            return torch.stack([img if img.shape[-2:] == (self.resolution, self.resolution) else
                                fit_square(img, self.resolution) for img in images], out=out)


def _as_is(batch):
    """The worker's batch unchanged (the default would turn the numpy labels into a tensor)."""
    return batch


class WebDatasetStream:
    """The object the trainer iterates: ``(uint8 [B,3,R,R], int64 [B])`` forever for this rank."""

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world_size: int, seed: int,
                 start_batch: int = 0):
        self.cfg, self.batch_size, self.rank, self.world_size, self.seed = cfg, batch_size, rank, world_size, seed
        self.shards = resolve_shards(cfg.path, remote=True, announce=rank == 0)
        self.num_classes = self.shards.num_classes
        self.resolution = cfg.resolution
        if self.shards.remote and cfg.verify != "off" and rank == 0:
            log.warning("data.verify=%s checks local folders only; the remote shards of %s are not verified "
                        "(damaged samples are skipped and counted while training; data.verify=off silences this)",
                        cfg.verify, cfg.path)
        # Shards written with --resolution N hold N x N images; originals ("keep") are probed: the
        # largest short side among the first few images of the first shard (the trainer refuses data
        # that it could only upsample).
        self.stored_resolution = self.shards.resolution or probe_short_side(self.shards.paths[0],
                                                                            remote=self.shards.remote)
        if self.shards.resolution is not None and self.shards.resolution != cfg.resolution:
            log.warning("shards hold %dpx images, data.resolution=%d: resizing every image while loading "
                        "(slow; write shards at the training resolution)", self.shards.resolution, cfg.resolution)
        if not 0.0 < cfg.random_crop_ratio <= 1.0:
            raise DataInputError(f"data.random_crop_ratio={cfg.random_crop_ratio} must be in (0, 1]")
        # Fails now (not in a worker) when the data cannot feed world_size x workers readers.
        SlotPlan(self.shards.counts, world_size * max(1, cfg.num_workers), seed)
        self.position = start_batch
        self.skipped = 0

    def _loader(self, dataset: ShardStream) -> DataLoader:
        workers = self.cfg.num_workers
        # No pin_memory thread: it would replace the shared ring buffers by copies before this
        # stream could keep their mappings; _owning_copy copies into pinned memory instead.
        return DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                          prefetch_factor=PREFETCH if workers > 0 else None)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        workers = max(1, self.cfg.num_workers)
        per_worker = [0] * workers
        rings: dict = {}  # (worker, ring index) -> that worker's shared buffer, mapped here
        dataset = ShardStream(self.shards, self.cfg, self.batch_size, self.rank, self.world_size, self.seed,
                              self.position)
        own = self._owning_copy()
        for j, batch in enumerate(self._loader(dataset)):
            worker = j % workers  # an endless stream: the DataLoader takes the workers in turn
            images = batch.images
            if batch.ring_index >= 0:
                if images is None:
                    images = rings[worker, batch.ring_index]
                else:
                    rings[worker, batch.ring_index] = images
            per_worker[worker] = batch.skipped
            self.skipped = sum(per_worker)
            self.position += 1
            yield own(images), torch.from_numpy(batch.labels)

    def iter_epoch(self, epoch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, List[str]]]:
        """This rank's share of one epoch, ``(images, labels, keys)`` batches (the last ones may be
        short); through the same workers and decode path as training. For tests and tools."""
        dataset = ShardStream(self.shards, self.cfg, self.batch_size, self.rank, self.world_size, self.seed,
                              epoch=epoch)
        own = self._owning_copy()
        for batch in self._loader(dataset):
            yield own(batch.images), torch.from_numpy(batch.labels), batch.keys

    def _owning_copy(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Worker batches live in buffers that the worker reuses: hand out a copy, in pinned memory
        where CUDA is available (what the DataLoader's pin-memory thread would do)."""
        if self.cfg.num_workers == 0:
            return _as_is
        return torch.Tensor.pin_memory if torch.cuda.is_available() else torch.Tensor.clone

    def state_dict(self) -> dict:
        return {"batches": self.position, "skipped": self.skipped}


@register_backend("webdataset")
def build_webdataset(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                     start_batch: int = 0) -> WebDatasetStream:
    return WebDatasetStream(cfg, batch_size, rank, world_size, seed, start_batch)
