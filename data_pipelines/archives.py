"""ImageNet as it is distributed, read in place: tar archives (nested or flat), the devkit, parquet.

Nothing is extracted to disk.

* ``ILSVRC2012_img_train.tar`` holds one tar per class (``n01440764.tar`` ...). :func:`list_tar` reads
  only the tar headers (Python's ``tarfile`` seeks over the data), descending into the inner tars,
  and records each JPEG's absolute byte offset and size in the outer file; a member is later read
  with one ``pread`` (:class:`MemberReader`), so shards can mix classes without a second copy of
  the data. A train folder holding the per-class tars themselves (outer tar unpacked) is read the
  same way.
* ``ILSVRC2012_img_val.tar`` is a flat tar of 50,000 JPEGs, listed the same way.
* ``ILSVRC2012_devkit_t12.tar.gz`` is read inside the archive: ``data/meta.mat`` (``synsets``:
  ILSVRC2012_ID, WNID, words, gloss, num_children, ...) maps the devkit's class ids (1..1000, in
  the devkit's own order, which is *not* sorted) to WordNet ids, and
  ``data/ILSVRC2012_validation_ground_truth.txt`` gives the id of ``ILSVRC2012_val_{i:08d}`` on
  line i. The standard index of a class is the position of its WordNet id in sorted order, as in
  torchvision's ``ImageNet`` (which sorts the wnid folders it makes with ``ImageFolder``).
* Hugging Face ``imagenet-1k`` parquet (``data/train-*.parquet``, ``data/validation-*.parquet``):
  columns ``image`` (struct of ``bytes``, ``path``) and ``label``, read with pyarrow one row group
  at a time. Its label order is checked against the standard wnid list: every row whose
  ``image.path`` names a WordNet id must carry that id's standard index, and class names stored in
  the file's Hugging Face metadata must be 1000.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

WNID_IN_NAME = re.compile(r"(n\d{8})")
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_META = "data/meta.mat"
DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ArchiveError(ValueError):
    """An archive is unreadable or not the expected layout."""


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        tar = tarfile.open(str(path), mode="r:")  # uncompressed: headers are read, data is seeked over
    except tarfile.ReadError as exc:
        raise ArchiveError(f"{str(path)!r} is not an uncompressed tar archive ({exc}); the ILSVRC-2012 image "
                           f"archives are plain tars") from None
    except OSError as exc:
        raise ArchiveError(f"cannot read {str(path)!r}: {exc}") from None
    return tar


def list_tar(path: Path, nested: bool) -> List[Tuple[str, str, int, int]]:
    """``(class, member name, offset, size)`` of every image in the tar, sorted by (class, name).

    ``nested``: members are per-class tars ``WNID.tar`` (class = the inner tar's stem); otherwise
    members are images and the class is "" (flat val archive). Offsets are absolute in ``path``.
    """
    rows: List[Tuple[str, str, int, int]] = []
    with _open_tar(path) as outer:
        try:
            for m in outer:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                if nested:
                    if not base.endswith(".tar"):
                        continue
                    wnid = base[:-4]
                    inner_obj = outer.extractfile(m)
                    try:
                        inner = tarfile.open(fileobj=inner_obj, mode="r:")
                    except tarfile.ReadError as exc:
                        raise ArchiveError(f"{str(path)!r}: member {m.name!r} is not a tar ({exc})") from None
                    for im in inner:
                        if im.isfile() and im.name.lower().endswith(IMAGE_SUFFIXES):
                            rows.append((wnid, os.path.basename(im.name), m.offset_data + im.offset_data, im.size))
                elif base.lower().endswith(IMAGE_SUFFIXES):
                    rows.append(("", base, m.offset_data, m.size))
        except (tarfile.TarError, EOFError) as exc:
            raise ArchiveError(f"{str(path)!r} is damaged or truncated: {exc}") from None
    rows.sort(key=lambda r: (r[0], r[1]))
    return rows


def tar_members_are_tars(path: Path) -> bool:
    """Whether the first file member of ``path`` is itself a ``.tar`` (the nested train archive)."""
    with _open_tar(path) as tar:
        for m in tar:
            if m.isfile():
                return m.name.endswith(".tar")
    return False


class MemberReader:
    """Reads byte ranges of archive files by offset (one ``pread`` each); keeps up to ``max_open``
    files open per process (1000 per-class tars would exceed a usual limit of 1024 descriptors)."""

    def __init__(self, max_open: int = 32) -> None:
        self._fds: Dict[str, int] = {}
        self._pid = os.getpid()
        self.max_open = max_open

    def read(self, path: str, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:  # a forked worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= self.max_open:  # close the oldest (items come in archive order)
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{path}: {size} bytes expected at offset {offset}, got {len(data)} (archive truncated)")
        return data


# ---------------------------------------------------------------------------------------------- devkit


def _devkit_members(path: Path) -> Dict[str, bytes]:
    """meta.mat and the val ground truth from the devkit (a .tar.gz or an extracted folder)."""
    wanted = {DEVKIT_META: None, DEVKIT_TRUTH: None}
    if path.is_dir():
        base = path / "ILSVRC2012_devkit_t12" if (path / "ILSVRC2012_devkit_t12").is_dir() else path
        for key in wanted:
            if (base / key).is_file():
                wanted[key] = (base / key).read_bytes()
    else:
        try:
            with tarfile.open(str(path), mode="r:*") as tar:
                for m in tar:
                    for key in wanted:
                        if m.isfile() and (m.name.endswith("/" + key) or m.name == key):
                            wanted[key] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"{str(path)!r} is not a readable devkit archive: {exc}") from None
    missing = [k for k, v in wanted.items() if v is None]
    if missing:
        raise ArchiveError(f"{str(path)!r} lacks {missing}; expected the ILSVRC2012_devkit_t12 layout")
    return wanted


def devkit_id_to_wnid(meta_mat: bytes, where: str) -> Dict[int, str]:
    """ILSVRC2012_ID -> WordNet id of the 1000 leaf synsets (num_children == 0) of meta.mat."""
    from scipy.io import loadmat
    try:
        synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
        fields = synsets.dtype.names or ()
        # The 1000 classes are the leaves (num_children 0, as torchvision selects them), ids 1..1000.
        leaf = ((lambda s: int(s["num_children"]) == 0) if "num_children" in fields
                else (lambda s: int(s["ILSVRC2012_ID"]) <= 1000))
        table = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if leaf(s)}
    except Exception as exc:  # scipy raises several types on a damaged file
        raise ArchiveError(f"{where}: meta.mat has no readable synsets table ({type(exc).__name__}: {exc})") from None
    if len(table) != 1000:
        raise ArchiveError(f"{where}: meta.mat lists {len(table)} leaf synsets, expected 1000")
    return table


def devkit_val_wnids(path: Path) -> Dict[str, str]:
    """``ILSVRC2012_val_{i:08d}`` -> WordNet id, from the devkit archive or folder at ``path``."""
    members = _devkit_members(path)
    id_to_wnid = devkit_id_to_wnid(members[DEVKIT_META], str(path))
    labels = {}
    for i, line in enumerate(members[DEVKIT_TRUTH].decode().split(), start=1):
        if int(line) not in id_to_wnid:
            raise ArchiveError(f"{str(path)!r} ground truth line {i}: class id {line} is not in meta.mat (1..1000)")
        labels[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[int(line)]
    return labels


# ---------------------------------------------------------------------------------------------- parquet


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ArchiveError("reading Hugging Face parquet files needs pyarrow: pip install 'sngan[imagenet]' "
                           "(or pip install pyarrow)") from None
    return pq


def list_parquet(files: Sequence[Path], standard: Dict[str, int]) -> Tuple[np.ndarray, List[Tuple[int, int]], dict]:
    """Labels of every row, ``(file index, row)`` per row, and facts checked; validates the label order.

    ``standard``: WordNet id -> standard index. Raises :class:`ArchiveError` when the columns are
    not ``image{bytes,path}`` + ``label``, a label is outside 0..999, or a row's path names a
    WordNet id whose standard index differs from its label.
    """
    pq = _pq()
    labels, where = [], []
    checked = 0
    for fi, f in enumerate(files):
        try:
            pf = pq.ParquetFile(str(f))
        except Exception as exc:
            raise ArchiveError(f"{str(f)!r} is not a readable parquet file: {exc}") from None
        schema = pf.schema_arrow
        names = schema.names
        if "image" not in names or "label" not in names:
            raise ArchiveError(f"{str(f)!r} has columns {names}; expected image{{bytes,path}} and label "
                               f"(Hugging Face imagenet-1k)")
        image_fields = [schema.field("image").type.field(i).name for i in range(schema.field("image").type.num_fields)]
        if "bytes" not in image_fields:
            raise ArchiveError(f"{str(f)!r}: column image has fields {image_fields}, expected bytes and path")
        meta = (schema.metadata or {}).get(b"huggingface")
        if meta:
            try:
                feature = json.loads(meta)["info"]["features"]["label"]
                if "names" in feature and len(feature["names"]) != 1000:
                    raise ArchiveError(f"{str(f)!r}: the label feature names {len(feature['names'])} classes, "
                                       f"expected the 1000 of ILSVRC-2012")
            except (KeyError, TypeError, ValueError):
                pass
        cols = ["label"] + (["image.path"] if "path" in image_fields else [])
        table = pf.read(columns=cols)
        lab = table.column("label").to_numpy(zero_copy_only=False)
        if len(lab) and (np.min(lab) < 0 or np.max(lab) > 999):
            bad = int(np.min(lab)) if np.min(lab) < 0 else int(np.max(lab))
            raise ArchiveError(f"{str(f)!r} has label {bad}, outside 0..999 (a test split without labels "
                               f"cannot be prepared as labelled data)")
        if "image" in table.column_names:  # the struct, holding only its path field
            paths = table.column("image").combine_chunks().field("path").to_pylist()
            for row, (p, y) in enumerate(zip(paths, lab.tolist())):
                found = WNID_IN_NAME.findall(p or "")
                if found:
                    checked += 1
                    if standard.get(found[-1], -1) != y:
                        raise ArchiveError(
                            f"{str(f)!r} row {row}: image {p!r} names {found[-1]} (standard index "
                            f"{standard.get(found[-1])}) but its label is {y}; this parquet does not use the "
                            f"standard sorted-wnid class order")
        labels.append(lab.astype(np.int64))
        where.extend((fi, r) for r in range(len(lab)))
    return (np.concatenate(labels) if labels else np.zeros(0, np.int64)), where, {"rows_with_wnid_checked": checked}


class ParquetReader:
    """Image bytes of parquet rows, read one row group at a time (files opened once per process)."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)
        self._open: Dict[int, object] = {}
        self._bounds: Dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def _file(self, fi: int):
        if os.getpid() != self._pid:
            self._open, self._pid = {}, os.getpid()
        if fi not in self._open:
            pf = _pq().ParquetFile(self.files[fi])
            self._open[fi] = pf
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self._bounds[fi] = np.concatenate([[0], np.cumsum(sizes)])
        return self._open[fi], self._bounds[fi]

    def read(self, rows: Sequence[Tuple[int, int]]) -> Iterator[bytes]:
        """Bytes of each ``(file, row)`` in ``rows`` (in that order; consecutive rows share reads)."""
        cache_key, cache = None, None
        for fi, row in rows:
            pf, bounds = self._file(fi)
            g = int(np.searchsorted(bounds, row, side="right") - 1)
            if (fi, g) != cache_key:
                col = pf.read_row_group(g, columns=["image"]).column("image").combine_chunks()
                cache_key, cache = (fi, g), col.field("bytes")
            value = cache[row - int(bounds[g])].as_py()
            if value is None:
                raise OSError(f"{self.files[fi]} row {row}: image.bytes is empty")
            yield value
