"""Small, faithful fakes of the ImageNet distribution files, built from generated JPEGs (tests, benchmarks).

:func:`make_distribution` writes into ``root``:

* ``ILSVRC2012_img_train.tar``: one ``WNID.tar`` per class, each holding ``WNID_N.JPEG``;
* ``ILSVRC2012_img_val.tar``: flat ``ILSVRC2012_val_{i:08d}.JPEG``;
* ``ILSVRC2012_devkit_t12.tar.gz``: ``ILSVRC2012_devkit_t12/data/meta.mat`` with the real field
  layout of ``synsets`` (ILSVRC2012_ID, WNID, words, gloss, num_children, children,
  wordnet_height, num_train_images): the 1000 real leaf wnids with ILSVRC2012_IDs 1..1000 in a
  scrambled (non-sorted) order, as in the real devkit, plus internal synsets with ids above 1000
  and children; and ``data/ILSVRC2012_validation_ground_truth.txt`` (the id of each val image);
* ``LOC_val_solution.csv`` (Kaggle) for the same val images;
* ``data/train-0000K-of-0000M.parquet`` and ``data/validation-...`` (Hugging Face imagenet-1k:
  ``image`` struct of ``bytes`` and ``path``, ``label`` = standard index, HF metadata with 1000
  class names), when ``parquet`` is set.

Images have classes from a handful of real wnids and sizes that vary (landscape, portrait, some
small), so resizing and ``--min-size`` are exercised.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from .fakedata import pattern
from .imagenet_classes import ILSVRC2012_WNIDS, imagenet_class_name

SIZES = ((72, 96), (96, 64), (80, 80), (40, 120), (110, 70))  # (h, w); one has a short side of 40


def _jpeg(index: int, h: int, w: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pattern(index, h, w)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1339000000
    tar.addfile(info, io.BytesIO(data))


def devkit_ids(seed: int = 0) -> Dict[str, int]:
    """WordNet id -> ILSVRC2012_ID: a fixed scramble of 1..1000 (the devkit's order is not sorted)."""
    perm = np.random.default_rng(seed).permutation(1000)
    return {w: int(perm[i]) + 1 for i, w in enumerate(ILSVRC2012_WNIDS)}


def write_meta_mat(path: Path, seed: int = 0) -> Dict[str, int]:
    from scipy.io import savemat
    ids = devkit_ids(seed)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = []
    for w, i in sorted(ids.items(), key=lambda kv: kv[1]):
        rows.append((i, w, imagenet_class_name(w), f"gloss of {w}", 0, np.zeros((1, 0)), 0, 1300))
    # internal nodes (the real file has 860 of them after the leaves), with children ids
    for k, (wnid, kids) in enumerate([("n00001740", [1001, 1002]), ("n00001930", [5, 6, 7]), ("n00002137", [1, 2])]):
        rows.append((1001 + k, wnid, f"internal {k}", "", len(kids), np.asarray(kids, np.uint16), k + 1, 0))
    synsets = np.empty((len(rows), 1), dtype=[(f, "O") for f in fields])
    for r, row in enumerate(rows):
        for f, v in zip(fields, row):
            synsets[r, 0][f] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"synsets": synsets})
    return ids


def make_distribution(root: str | Path, classes: Sequence[int] = (0, 7, 151, 293, 999), per_class: int = 4,
                      val_per_class: int = 2, parquet: bool = True, parquet_files: int = 2,
                      extra_train_members: bool = True) -> Dict[str, object]:
    """Write the distribution files; returns ``{"train": [(member, wnid)], "val": [(name, wnid)], ...}``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counter = 0
    train: List[Tuple[str, str, bytes]] = []
    for c in classes:
        wnid = ILSVRC2012_WNIDS[c]
        for j in range(per_class):
            h, w = SIZES[counter % len(SIZES)]
            train.append((f"{wnid}_{1000 + 37 * j}.JPEG", wnid, _jpeg(10_000 + counter, h, w)))
            counter += 1
    # The real archive's per-class tars are not in sorted order: write them reversed.
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w", format=tarfile.GNU_FORMAT) as outer:
        for c in reversed(list(classes)):
            wnid = ILSVRC2012_WNIDS[c]
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as inner:
                for name, _wn, data in reversed([t for t in train if t[1] == wnid]):
                    _add(inner, name, data)
            _add(outer, f"{wnid}.tar", buf.getvalue())
    # Validation: images interleaved across classes, numbered 1..N.
    val: List[Tuple[str, str, bytes]] = []
    order = [ILSVRC2012_WNIDS[c] for _ in range(val_per_class) for c in classes]
    rng = np.random.default_rng(1)
    order = [order[i] for i in rng.permutation(len(order))]
    for i, wnid in enumerate(order, start=1):
        h, w = SIZES[(i + 2) % len(SIZES)]
        val.append((f"ILSVRC2012_val_{i:08d}.JPEG", wnid, _jpeg(50_000 + i, h, w)))
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, _, data in val:
            _add(tar, name, data)
    # Devkit: meta.mat + ground truth, inside a .tar.gz.
    staging = root / ".devkit-staging"
    ids = write_meta_mat(staging / "ILSVRC2012_devkit_t12" / "data" / "meta.mat")
    truth = "".join(f"{ids[wnid]}\n" for _, wnid, _ in val)
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat",
             (staging / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").read_bytes())
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())
        _add(tar, "ILSVRC2012_devkit_t12/readme.txt", b"fake devkit for tests\n")
    import shutil
    shutil.rmtree(staging)
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["ImageId", "PredictionString"])
        for name, wnid, _ in val:
            wr.writerow([name.split(".")[0], f"{wnid} 1 2 30 40 {wnid} 5 6 20 30"])
    made: Dict[str, object] = {"train": [(n, w) for n, w, _ in sorted(train)], "val": [(n, w) for n, w, _ in val],
                               "train_bytes": {n: d for n, _, d in train}, "val_bytes": {n: d for n, _, d in val},
                               "devkit_ids": ids}
    if parquet:
        write_parquet(root / "data", "train", [(f"{n[:-5]}_{w}.JPEG", w, d) for n, w, d in train], parquet_files)
        write_parquet(root / "data", "validation", [(f"{n[:-5]}_{w}.JPEG", w, d) for n, w, d in val], 1)
    return made


def write_parquet(folder: Path, split: str, rows: Sequence[Tuple[str, str, bytes]], files: int,
                  row_group_size: int = 3) -> List[Path]:
    """Rows ``(path, wnid, jpeg)`` as Hugging Face imagenet-1k parquet (label = standard index)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from .imagenet_classes import WNID_TO_INDEX
    folder.mkdir(parents=True, exist_ok=True)
    hf = {"info": {"features": {"image": {"_type": "Image"},
                                "label": {"names": [imagenet_class_name(w) for w in ILSVRC2012_WNIDS],
                                          "_type": "ClassLabel"}}}}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("label", pa.int64())],
                       metadata={b"huggingface": json.dumps(hf).encode()})
    paths = []
    per = (len(rows) + files - 1) // files
    for k in range(files):
        part = rows[k * per:(k + 1) * per]
        table = pa.table({"image": pa.array([{"bytes": d, "path": p} for p, _, d in part], type=image_type),
                          "label": pa.array([WNID_TO_INDEX[w] for _, w, _ in part], type=pa.int64())},
                         schema=schema)
        path = folder / f"{split}-{k:05d}-of-{files:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths
