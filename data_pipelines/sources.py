"""Raw datasets the writer reads: ImageNet (train and val), any ImageFolder tree, CIFAR-10, STL-10.

:func:`open_source` checks the layout completely (path readable, expected files present, no empty
class folder, every val image labelled) and raises :class:`SourceError` with the bad path and what
was expected *before* any image is converted. The result is a :class:`Source`: a class list and
``len(source)`` items, each a file path or a pixel array plus a label, in a deterministic order
(sorted class, then sorted file name; the dataset's own order for CIFAR / STL-10).

An ImageFolder tree is read as torchvision's ``ImageFolder`` reads it (``make_dataset``): classes
are the sorted sub-folder names, and a class holds every file with an image extension at any depth
below its folder (``os.walk`` following symbolic links, walk entries and file names sorted), so
``CLASS/images/*.JPEG`` (several public ImageNet subsets) works and the labels equal torchvision's.
One deliberate difference: hidden folders (``.ipynb_checkpoints``) are not classes. The manifest's
``source.per_class`` lists the files found per class. ImageNet synset folders are read one level
deep, as before.

ImageNet is read from any form it is distributed in (:func:`open_imagenet`): extracted folders, the
train / val tar archives in place, the devkit archive, Kaggle's CSV, Hugging Face parquet (see
:mod:`data_pipelines.archives`). Its labels are always the standard ILSVRC-2012 indices (sorted
wnid), or 0..K-1 over the classes declared with ``classes`` in standard order; classes absent from
the source are an error unless ``allow_partial``, so a partial copy is never renumbered silently.
"""

from __future__ import annotations

import csv
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .archives import (DEVKIT, TRAIN_TAR, VAL_TAR, ArchiveError, MemberReader, ParquetReader, devkit_id_to_wnid,
                       devkit_val_wnids, list_parquet, list_tar, tar_members_are_tars)
from .imagenet_classes import ILSVRC2012_WNIDS, WNID_TO_INDEX, imagenet_class_name, preset_wnids

SOURCE_KINDS = ("imagenet", "imagefolder", "cifar10", "stl10")
# Same set as torchvision's ImageFolder; matched case-insensitively (ImageNet uses ``.JPEG``).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID_RE = re.compile(r"^n\d{8}$")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
STL10_SIDE = 96


class SourceError(ValueError):
    """The source path or layout is not usable; raised before any work starts."""


@dataclass
class ClassInfo:
    id: str            # folder name, WordNet id or dataset class name
    name: str          # human-readable name
    source_index: int  # index in the source's own full class list (ILSVRC-2012 index for ImageNet)


@dataclass
class Source:
    kind: str
    path: str
    split: str
    classes: List[ClassInfo]
    labels: np.ndarray                      # int64 [N]; -1 for unlabelled data (STL-10 unlabeled)
    files: Optional[List[str]] = None       # file sources: absolute paths, aligned with labels
    pixels: Optional[Callable[[int, int], np.ndarray]] = None  # array sources: (start, stop) -> uint8 [n, H, W, 3]
    # archive sources (tar members, parquet rows): item indices (ascending) -> bytes (or an OSError) each
    reader: Optional[Callable[[Sequence[int]], Iterator[Any]]] = None
    names: Optional[List[str]] = None       # archive sources: "archive:member" / "file.parquet#row" per item
    details: Dict[str, Any] = field(default_factory=dict)      # e.g. the labels file used, per_class counts

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "split": self.split, **self.details}


# ----------------------------------------------------------------------------------------------
# helpers


def _readable_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise SourceError(f"{what} {str(path)!r} does not exist")
    if not path.is_dir():
        raise SourceError(f"{what} {str(path)!r} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise SourceError(f"{what} {str(path)!r} is not readable (permissions)")
    return path


def _image_files(folder: Path) -> List[str]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise SourceError(f"cannot list {str(folder)!r}: {exc}") from None
    return [e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]


def _image_files_below(folder: Path) -> List[str]:
    """Every image file at any depth below ``folder``, in torchvision ``make_dataset``'s order.

    As torchvision: ``sorted(os.walk(folder, followlinks=True))`` and sorted file names, the
    extension matched case-insensitively. Unlike it, an unreadable sub-folder or a symbolic link
    back to a folder above it is an error (torchvision skips the first silently and walks the
    second until the path is too long).
    """
    def fail(exc: OSError) -> None:
        raise SourceError(f"cannot list {exc.filename!r} below class folder {str(folder)!r}: {exc.strerror}")

    walked, real_of = [], {}
    for root, dirs, fnames in os.walk(str(folder), onerror=fail, followlinks=True):
        real = os.path.realpath(root)
        parent = os.path.dirname(root)
        ancestors = set()
        while parent in real_of:          # the chain of folders above root, up to the class folder
            ancestors.add(real_of[parent])
            parent = os.path.dirname(parent)
        if real in ancestors:
            raise SourceError(f"{root!r} links back to a folder above it ({real!r}); the tree has no end. "
                              f"Remove the link")
        real_of[root] = real
        walked.append((root, dirs, fnames))
    return [os.path.join(root, name) for root, _, fnames in sorted(walked) for name in sorted(fnames)
            if name.lower().endswith(IMAGE_SUFFIXES)]


def _class_folders(root: Path) -> List[Path]:
    return sorted((Path(e.path) for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")),
                  key=lambda p: p.name)


def _split_dir(root: Path, split: str, nested: Sequence[str] = ()) -> Path:
    """``root/split`` (or ``root/<nested>/split``) when it exists, else ``root`` itself."""
    for base in (root, *(root / n for n in nested)):
        if (base / split).is_dir():
            return base / split
    return root


def _find_upwards(start: Path, names: Sequence[str], levels: int = 4) -> Optional[Path]:
    here = start.resolve()
    for _ in range(levels + 1):
        for name in names:
            if (here / name).is_file():
                return here / name
        here = here.parent
    return None


def _folder_tree(root: Path, what: str, any_depth: bool = False) -> Tuple[List[Path], List[str], List[int]]:
    """Class folders, then all image files with their class index; fails on an empty class.

    ``any_depth``: a class's images may sit in sub-folders of its folder (ImageFolder rules);
    otherwise only files directly in it count (ImageNet synset folders).
    """
    folders = _class_folders(root)
    if not folders:
        raise SourceError(f"{what} {str(root)!r} has no class sub-folders; expected "
                          f"{root}/<class>/<image files>")
    files, labels = [], []
    for index, folder in enumerate(folders):
        images = _image_files_below(folder) if any_depth else _image_files(folder)
        if not images:
            where = "at any depth" if any_depth else "directly in it"
            raise SourceError(f"class folder {str(folder)!r} holds no image files {where} "
                              f"({', '.join(IMAGE_SUFFIXES)}); remove it or add images")
        files.extend(images)
        labels.extend([index] * len(images))
    return folders, files, labels


# ----------------------------------------------------------------------------------------------
# ImageNet


def _synset_names(start: Path) -> Dict[str, str]:
    """WordNet id -> name from the Kaggle ``LOC_synset_mapping.txt`` or devkit ``synset_words.txt``."""
    found = _find_upwards(start, ("LOC_synset_mapping.txt", "synset_words.txt"))
    names: Dict[str, str] = {}
    if found is not None:
        for line in found.read_text(errors="replace").splitlines():
            wnid, _, rest = line.strip().partition(" ")
            if WNID_RE.match(wnid):
                names[wnid] = rest.split(",")[0].strip() or wnid
    return names


def _imagenet_class(wnid: str, names: Dict[str, str]) -> ClassInfo:
    return ClassInfo(wnid, names.get(wnid) or imagenet_class_name(wnid), WNID_TO_INDEX[wnid])


def _check_wnids(wnids: Sequence[str], where: str) -> None:
    bad = [w for w in wnids if not WNID_RE.match(w)]
    if bad:
        raise SourceError(f"{where}: {bad[:3]} are not ImageNet synset folders (nXXXXXXXX); "
                          f"use --source imagefolder for other trees")
    unknown = [w for w in wnids if w not in WNID_TO_INDEX]
    if unknown:
        raise SourceError(f"{where}: {unknown[:3]} are not among the 1000 ILSVRC-2012 classes; "
                          f"use --source imagefolder for other ImageNet subsets")


def _val_labels_kaggle(csv_path: Path) -> Dict[str, str]:
    labels = {}
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0] != "ImageId":
            raise SourceError(f"{str(csv_path)!r} is not LOC_val_solution.csv "
                              f"(expected header ImageId,PredictionString, got {header})")
        for row in reader:
            if len(row) >= 2 and row[1].split():
                labels[row[0]] = row[1].split()[0]
    return labels


def _val_labels_devkit(path: Path) -> Dict[str, str]:
    """Devkit ground truth (line i: the ILSVRC2012_ID of ILSVRC2012_val_{i:08d}), mapped to WordNet ids
    through meta.mat. ``path``: the devkit .tar.gz (read inside), its folder, or the ground-truth
    .txt with ``meta.mat`` beside it."""
    try:
        if path.is_file() and path.suffix == ".txt":
            meta = path.with_name("meta.mat")
            if not meta.is_file():
                raise SourceError(f"{str(path)!r} needs the devkit's meta.mat beside it (not found at "
                                  f"{str(meta)!r}); or pass --labels {DEVKIT}")
            table = devkit_id_to_wnid(meta.read_bytes(), str(meta))
            labels = {}
            for i, line in enumerate(path.read_text().split(), start=1):
                if int(line) not in table:
                    raise SourceError(f"{str(path)!r} line {i}: class id {line} is not in meta.mat (1..1000)")
                labels[f"ILSVRC2012_val_{i:08d}"] = table[int(line)]
            return labels
        return devkit_val_wnids(path)
    except ArchiveError as exc:
        raise SourceError(str(exc)) from None


def _val_label_table(found: Path) -> Dict[str, str]:
    if found.suffix == ".csv":
        return _val_labels_kaggle(found)
    return _val_labels_devkit(found)


VAL_LABEL_NAMES = ("LOC_val_solution.csv", DEVKIT, "ILSVRC2012_validation_ground_truth.txt",
                   "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                   "data/ILSVRC2012_validation_ground_truth.txt")


def _val_labels_for(root: Path, labels_file: Optional[str]) -> Path:
    if labels_file:
        found = Path(labels_file).expanduser()
        if not (found.is_file() or found.is_dir()):
            raise SourceError(f"--labels {labels_file!r} is not a readable file")
        return found
    found = _find_upwards(root if root.is_dir() else root.parent, VAL_LABEL_NAMES)
    if found is None:
        raise SourceError(f"ImageNet val source {str(root)!r} is flat and no labels file was found near it; "
                          f"pass --labels LOC_val_solution.csv (Kaggle) or --labels {DEVKIT}")
    return found


def _label_val(stems: List[str], found: Path) -> List[str]:
    table = _val_label_table(found)
    missing = [s for s in stems if s not in table]
    if missing:
        raise SourceError(f"{len(missing)} val images have no label in {str(found)!r}, e.g. {missing[:3]}")
    return [table[s] for s in stems]


@dataclass
class _Listing:
    """What an ImageNet source holds, before classes are chosen: one entry per image."""
    wnids: List[str]
    names: List[str]                                  # file path, or archive:member / file.parquet#row
    files: Optional[List[str]] = None                 # plain files
    locs: Optional[List[Tuple[str, int, int]]] = None  # (archive path, offset, size)
    rows: Optional[List[Tuple[int, int]]] = None      # parquet (file index, row)
    parquet_files: Optional[List[str]] = None
    path: str = ""
    details: Dict[str, Any] = field(default_factory=dict)


def _abbrev(items: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" ... ({len(items) - n} more)" if len(items) > n else "")


def _listing_from_tars(tars: List[Path], nested: bool) -> Tuple[List[str], List[str], List[Tuple[str, int, int]]]:
    wnids, names, locs = [], [], []
    for t in tars:
        try:
            rows = list_tar(t, nested=nested)
        except ArchiveError as exc:
            raise SourceError(str(exc)) from None
        cls = "" if nested else t.name[:-4]
        for wnid, member, offset, size in rows:
            wnids.append(wnid or cls)
            names.append(f"{t}:{member}")
            locs.append((str(t.resolve()), offset, size))
    return wnids, names, locs


def _listing_train_tar(tar: Path) -> _Listing:
    if not tar_members_are_tars(tar):
        raise SourceError(f"{str(tar)!r} does not hold per-class tars (n01440764.tar ...); is it the train archive?")
    wnids, names, locs = _listing_from_tars([tar], nested=True)
    _check_wnids(sorted(set(wnids)), f"ImageNet train archive {str(tar)!r}")
    return _Listing(wnids, names, locs=locs, path=str(tar.resolve()), details={"archive": tar.name})


def _listing_val_tar(tar: Path, labels_file: Optional[str]) -> _Listing:
    found = _val_labels_for(tar, labels_file)
    _, names, locs = _flat_tar(tar)
    stems = [n.rsplit(":", 1)[1].split(".")[0] for n in names]
    wnids = _label_val(stems, found)
    _check_wnids(sorted(set(wnids)), f"labels file {str(found)!r}")
    return _Listing(wnids, names, locs=locs, path=str(tar.resolve()),
                    details={"archive": tar.name, "labels_file": str(found.resolve())})


def _flat_tar(tar: Path) -> Tuple[List[str], List[str], List[Tuple[str, int, int]]]:
    try:
        rows = list_tar(tar, nested=False)
    except ArchiveError as exc:
        raise SourceError(str(exc)) from None
    if not rows:
        raise SourceError(f"{str(tar)!r} holds no image files")
    return ([""] * len(rows), [f"{tar}:{r[1]}" for r in rows], [(str(tar.resolve()), r[2], r[3]) for r in rows])


def _listing_parquet(files: List[Path]) -> _Listing:
    try:
        labels, rows, facts = list_parquet(files, WNID_TO_INDEX)
    except ArchiveError as exc:
        raise SourceError(str(exc)) from None
    if not len(labels):
        raise SourceError(f"the parquet files {[f.name for f in files][:3]} hold no rows")
    wnids = [ILSVRC2012_WNIDS[y] for y in labels.tolist()]
    names = [f"{files[fi].name}#{r}" for fi, r in rows]
    return _Listing(wnids, names, rows=rows, parquet_files=[str(f.resolve()) for f in files],
                    path=str(files[0].parent.resolve()),
                    details={"parquet_files": len(files), **facts})


def _listing_folder(root: Path, split: str, labels_file: Optional[str]) -> _Listing:
    subdirs = _class_folders(root)
    tars = sorted(e.name for e in os.scandir(root) if e.is_file() and e.name.endswith(".tar"))
    if subdirs:
        _check_wnids([f.name for f in subdirs], f"ImageNet {split} folder {str(root)!r}")
        if tars:
            raise SourceError(f"ImageNet {split} folder {str(root)!r} holds {len(subdirs)} class folders and "
                              f"{len(tars)} class archives not extracted ({_abbrev(tars)}); finish extracting them "
                              f"(or remove them and pass --classes / --allow-partial)")
        wnids, files = [], []
        for folder in subdirs:
            images = _image_files(folder)
            if not images:
                raise SourceError(f"class folder {str(folder)!r} holds no image files directly in it "
                                  f"({', '.join(IMAGE_SUFFIXES)}); remove it or add images")
            files.extend(images)
            wnids.extend([folder.name] * len(images))
        return _Listing(wnids, files, files=files, path=str(root.resolve()))
    if tars and split == "train":  # the outer train tar unpacked: train/n01440764.tar ...
        _check_wnids([t[:-4] for t in tars], f"ImageNet train folder {str(root)!r}")
        wnids, names, locs = _listing_from_tars([root / t for t in tars], nested=False)
        return _Listing(wnids, names, locs=locs, path=str(root.resolve()), details={"class_archives": len(tars)})
    if split == "train":
        raise SourceError(f"ImageNet train folder {str(root)!r} has no synset sub-folders and no class archives "
                          f"(expected {root}/n01440764/*.JPEG, {root}/n01440764.tar, or {TRAIN_TAR})")
    files = _image_files(root)
    if not files:
        raise SourceError(f"ImageNet val folder {str(root)!r} holds no image files (nor {VAL_TAR})")
    found = _val_labels_for(root, labels_file)
    wnids = _label_val([Path(f).name.split(".")[0] for f in files], found)
    _check_wnids(sorted(set(wnids)), f"labels file {str(found)!r}")
    return _Listing(wnids, files, files=files, path=str(root.resolve()),
                    details={"labels_file": str(found.resolve())})


def _hf_parquet(root: Path, split: str) -> List[Path]:
    hf = {"val": "validation"}.get(split, split)
    for pattern in (f"data/{hf}-*.parquet", f"{hf}-*.parquet", f"data/{split}-*.parquet"):
        found = sorted(root.glob(pattern))
        if found:
            return found
    return []


def _imagenet_listing(path: Path, split: str, labels_file: Optional[str]) -> _Listing:
    if split not in ("train", "val"):
        raise SourceError(f"--split {split!r} does not exist for imagenet; valid: train, val (the test split has "
                          f"no public labels)")
    if not path.exists():
        raise SourceError(f"ImageNet path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix == ".parquet":
            return _listing_parquet([path])
        if split == "train":
            return _listing_train_tar(path)
        return _listing_val_tar(path, labels_file)
    _readable_dir(path, "ImageNet path")
    for base in (path, path / "ILSVRC/Data/CLS-LOC", path / "Data/CLS-LOC"):
        if (base / split).is_dir():
            return _listing_folder(_readable_dir(base / split, f"ImageNet {split} folder"), split, labels_file)
    archive = path / (TRAIN_TAR if split == "train" else VAL_TAR)
    if archive.is_file():
        return _listing_train_tar(archive) if split == "train" else _listing_val_tar(archive, labels_file)
    parquet = _hf_parquet(path, split)
    if parquet:
        return _listing_parquet(parquet)
    return _listing_folder(path, split, labels_file)


def _declared_wnids(classes: str, names: Dict[str, str]) -> List[str]:
    by_name: Dict[str, str] = {}
    for w in ILSVRC2012_WNIDS:
        by_name.setdefault(imagenet_class_name(w), w)
    for w, n in names.items():
        by_name.setdefault(n, w)
    out = []
    for item in parse_class_list(classes):
        wnid = item if item in WNID_TO_INDEX else by_name.get(item)
        if wnid is None:
            raise SourceError(f"--classes: {item!r} is not one of the 1000 ILSVRC-2012 classes (a WordNet id such "
                              f"as n02085620, a class name such as Chihuahua, or a preset)")
        out.append(wnid)
    return sorted(set(out), key=WNID_TO_INDEX.__getitem__)


def open_imagenet(path: Path, split: str, labels_file: Optional[str], classes: Optional[str] = None,
                  allow_partial: bool = False) -> Source:
    """ImageNet from any of its distributed forms, with standard class indices.

    Without ``classes`` the labels are the standard ILSVRC-2012 indices (sorted wnid, 0..999) and
    all 1000 classes must be present; with ``classes`` the declared classes are numbered 0..K-1 in
    standard order, whatever is present. Missing classes are an error unless ``allow_partial``.
    """
    listing = _imagenet_listing(path, split, labels_file)
    names = _synset_names(Path(listing.path))
    declared = _declared_wnids(classes, names) if classes else list(ILSVRC2012_WNIDS)
    present = set(listing.wnids)
    missing = [w for w in declared if w not in present]
    what = f"the {len(declared)} classes declared with --classes" if classes else "the 1000 ILSVRC-2012 classes"
    if missing and not allow_partial:
        raise SourceError(f"ImageNet {split} source {listing.path!r} lacks {len(missing)} of {what} "
                          f"({_abbrev(missing)}); declare the classes it should have with --classes (numbered "
                          f"0..K-1 in standard order), or pass --allow-partial to keep the "
                          f"{'declared' if classes else 'standard 1000-class'} numbering with those classes empty")
    index = {w: i for i, w in enumerate(declared)}
    keep = [i for i, w in enumerate(listing.wnids) if w in index]
    if not keep:
        raise SourceError(f"ImageNet {split} source {listing.path!r} holds none of {what}")
    labels = np.asarray([index[listing.wnids[i]] for i in keep], np.int64)
    details: Dict[str, Any] = dict(listing.details)
    if classes:
        details["classes_selected"] = str(len(declared))
    if missing:
        details["missing_classes"] = missing
    item_names = [listing.names[i] for i in keep]
    files = reader = None
    if listing.files is not None:
        files = item_names
    elif listing.locs is not None:
        locs = [listing.locs[i] for i in keep]
        members = MemberReader()

        def reader(idx: Sequence[int]) -> Iterator[Any]:
            for i in idx:
                try:
                    yield members.read(*locs[i])
                except OSError as exc:
                    yield exc
    else:
        rows = [listing.rows[i] for i in keep]
        pq_reader = ParquetReader(listing.parquet_files)

        def reader(idx: Sequence[int]) -> Iterator[Any]:
            try:
                yield from pq_reader.read([rows[i] for i in idx])
            except Exception as exc:  # a damaged row group: every remaining item of the request fails
                raise OSError(f"parquet read failed: {exc}") from None
    return Source("imagenet", listing.path, split, [_imagenet_class(w, names) for w in declared], labels,
                  files=files, reader=reader, names=item_names if files is None else None, details=details)


def open_imagefolder(path: Path, split: str) -> Source:
    root = _readable_dir(_split_dir(_readable_dir(path, "ImageFolder path"), split), "ImageFolder path")
    folders, files, labels = _folder_tree(root, "ImageFolder path", any_depth=True)
    classes = [ClassInfo(f.name, f.name, i) for i, f in enumerate(folders)]
    labels = np.asarray(labels, np.int64)
    per_class = np.bincount(labels, minlength=len(classes)).tolist()
    return Source("imagefolder", str(root.resolve()), split, classes, labels, files=files,
                  details={"per_class": per_class})


# ----------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches) and STL-10 (binary)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise SourceError(f"{str(path)!r} is not a CIFAR python pickle: {type(exc).__name__}: {exc}") from None


def open_cifar10(path: Path, split: str) -> Source:
    root = _readable_dir(path, "CIFAR-10 path")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if split not in names:
        raise SourceError(f"--split {split!r} does not exist for cifar10; valid: train, test")
    missing = [n for n in names[split] + ["batches.meta"] if not (root / n).is_file()]
    if missing:
        raise SourceError(f"{str(root)!r} is not a cifar-10-batches-py folder: missing {missing}")
    data, labels = [], []
    for name in names[split]:
        batch = _unpickle(root / name)
        if b"data" not in batch or b"labels" not in batch:
            raise SourceError(f"{str(root / name)!r} has no b'data' / b'labels' entries")
        arr = np.asarray(batch[b"data"], dtype=np.uint8)
        if arr.ndim != 2 or arr.shape[1] != 3072 or len(batch[b"labels"]) != len(arr):
            raise SourceError(f"{str(root / name)!r}: data has shape {arr.shape}, expected (N, 3072) "
                              f"with N labels")
        data.append(arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch[b"labels"])
    meta = _unpickle(root / "batches.meta")
    label_names = [n.decode() for n in meta.get(b"label_names", [])] or [str(i) for i in range(10)]
    pixels = np.ascontiguousarray(np.concatenate(data))
    classes = [ClassInfo(n, n, i) for i, n in enumerate(label_names)]
    return Source("cifar10", str(root.resolve()), split, classes, np.asarray(labels, np.int64),
                  pixels=lambda a, b: pixels[a:b])


def open_stl10(path: Path, split: str) -> Source:
    root = _readable_dir(path, "STL-10 path")
    if (root / "stl10_binary").is_dir():
        root = root / "stl10_binary"
    if split not in ("train", "test", "unlabeled"):
        raise SourceError(f"--split {split!r} does not exist for stl10; valid: train, test, unlabeled")
    x_path = root / f"{split}_X.bin"
    if not x_path.is_file():
        raise SourceError(f"{str(root)!r} is not an stl10_binary folder: missing {x_path.name}")
    per_image = 3 * STL10_SIDE * STL10_SIDE
    size = x_path.stat().st_size
    if size == 0 or size % per_image:
        raise SourceError(f"{str(x_path)!r} has {size} bytes, not a multiple of {per_image} (3x96x96)")
    n = size // per_image
    if split == "unlabeled":
        labels, classes = np.full(n, -1, np.int64), []
    else:
        y_path = root / f"{split}_y.bin"
        if not y_path.is_file():
            raise SourceError(f"{str(root)!r}: missing {y_path.name} for the labelled {split} split")
        raw = np.fromfile(y_path, dtype=np.uint8)
        if len(raw) != n or raw.min() < 1 or raw.max() > 10:
            raise SourceError(f"{str(y_path)!r}: {len(raw)} labels in 1..10 expected {n}")
        labels = raw.astype(np.int64) - 1  # the file stores 1..10
        names_file = root / "class_names.txt"
        names = names_file.read_text().split() if names_file.is_file() else list(STL10_CLASSES)
        classes = [ClassInfo(nm, nm, i) for i, nm in enumerate(names)]
    images = np.memmap(x_path, dtype=np.uint8, mode="r", shape=(n, 3, STL10_SIDE, STL10_SIDE))

    def pixels(a: int, b: int) -> np.ndarray:
        # Stored channel-major and, within a channel, column-major (MATLAB order): C, W, H.
        return np.ascontiguousarray(images[a:b].transpose(0, 3, 2, 1))

    return Source("stl10", str(root.resolve()), split, classes, labels, pixels=pixels)


# ----------------------------------------------------------------------------------------------


def select_classes(source: Source, wanted: Sequence[str]) -> Source:
    """Keep only the classes named in ``wanted`` (ids, names or a preset); labels become 0..K-1
    in the source's class order."""
    if not source.classes:
        raise SourceError(f"--classes given but the {source.kind} {source.split} split is unlabelled")
    by_key: Dict[str, int] = {}
    for i, c in enumerate(source.classes):
        by_key.setdefault(c.id, i)
        by_key.setdefault(c.name, i)
    keep = set()
    for item in wanted:
        if item in by_key:
            keep.add(by_key[item])
        else:
            valid = ", ".join(c.id for c in source.classes[:8])
            raise SourceError(f"class {item!r} is not in the source; valid ids include: {valid}, ... "
                              f"({len(source.classes)} classes)")
    old = sorted(keep)
    remap = np.full(len(source.classes), -1, np.int64)
    remap[old] = np.arange(len(old))
    mask = remap[source.labels] >= 0
    picked = np.nonzero(mask)[0]
    files = [source.files[i] for i in picked] if source.files is not None else None
    pixels = None
    if source.pixels is not None:
        base = source.pixels

        def pixels(a: int, b: int) -> np.ndarray:
            idx = picked[a:b]
            lo = int(idx[0]) if len(idx) else 0
            return base(lo, int(idx[-1]) + 1 if len(idx) else 0)[idx - lo]

    reader = None
    if source.reader is not None:
        base_reader = source.reader

        def reader(idx: Sequence[int]) -> Iterator[Any]:
            return base_reader([int(picked[i]) for i in idx])

    details = dict(source.details, classes_selected=str(len(old)))
    if "per_class" in details:  # the counts of the kept classes, in their new order
        details["per_class"] = [int(source.details["per_class"][i]) for i in old]
    return Source(source.kind, source.path, source.split, [source.classes[i] for i in old],
                  remap[source.labels[picked]], files=files, pixels=pixels, details=details, reader=reader,
                  names=[source.names[i] for i in picked] if source.names is not None else None)


def parse_class_list(text: str) -> List[str]:
    """``--classes``: a preset name, ``@file`` with one id per line, or a comma-separated list."""
    text = text.strip()
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise SourceError(f"--classes file {text[1:]!r} does not exist")
        return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if "," not in text and not WNID_RE.match(text):
        try:
            return preset_wnids(text)
        except ValueError:
            pass  # a single class name, e.g. --classes cat
    return [t.strip() for t in text.split(",") if t.strip()]


def open_source(kind: str, path: str, split: str = "train", labels_file: Optional[str] = None,
                classes: Optional[str] = None, allow_partial: bool = False) -> Source:
    """``allow_partial``: ImageNet only; keep the standard (or declared) numbering when classes are missing."""
    if kind not in SOURCE_KINDS:
        raise SourceError(f"--source {kind!r} is not known; valid: {', '.join(SOURCE_KINDS)}")
    p = Path(path).expanduser()
    if kind == "imagenet":
        source = open_imagenet(p, split, labels_file, classes=classes, allow_partial=allow_partial)
        classes = None  # chosen by open_imagenet, in the standard numbering
    elif kind == "imagefolder":
        source = open_imagefolder(p, split)
    elif kind == "cifar10":
        source = open_cifar10(p, split)
    else:
        source = open_stl10(p, split)
    if classes:
        source = select_classes(source, parse_class_list(classes))
    if len(source) == 0:
        raise SourceError(f"{kind} source {path!r} ({split}) has no samples")
    return source
