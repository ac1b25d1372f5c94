"""ImageNet as distributed: train/val archives, the devkit, Kaggle's CSV, Hugging Face parquet.

The fakes (``data_pipelines.fake_distribution``) have real wnids, a devkit meta.mat with the real
field layout and a scrambled ILSVRC2012_ID order. Labels are checked, image by image, against what
torchvision's ``ImageNet`` makes of the same archives (torchvision extracts them itself; only its
md5 check of the real files is bypassed, since fakes cannot have the real checksums).
"""

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.fake_distribution import SIZES, make_distribution
from data_pipelines.imagenet_classes import ILSVRC2012_WNIDS, WNID_TO_INDEX, preset_wnids
from data_pipelines.manifest import read_manifest
from data_pipelines.prepare import main as prepare_main
from data_pipelines.tario import index_shard, read_shard

CLASSES = (0, 7, 151, 293, 999)  # tench, cock, Chihuahua, cheetah, toilet tissue


def samples(folder):
    """[(key, jpeg bytes, label)] of every sample written to ``folder``."""
    out = []
    for shard in read_manifest(folder)["shards"]:
        buf = read_shard(os.path.join(folder, shard["name"]))
        index, damage = index_shard(buf)
        assert damage is None
        for offset, size, label, _ in index.tolist():
            key = bytes(buf[offset - 512:offset - 412]).split(b"\0")[0].decode().split(".")[0]
            out.append((key, bytes(buf[offset:offset + size]), label))
    return out


def sha(data):
    return hashlib.sha256(data).hexdigest()


def prep(src, out, *args):
    return prepare_main([str(src), str(out), "--source", "imagenet", "--workers", "2", "--quiet",
                         "--samples-per-shard", "4", *args])


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    made = make_distribution(root, classes=CLASSES, per_class=4, val_per_class=2)
    return root, made


@pytest.fixture(scope="module")
def torchvision_truth(dist, tmp_path_factory):
    """{sha256 of image bytes: (wnid, label among torchvision's 1000-class order)} for train and val."""
    import torchvision.datasets.imagenet as tvin
    root, _ = dist
    tv = tmp_path_factory.mktemp("tv")
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        shutil.copy(root / name, tv / name)
    mp = pytest.MonkeyPatch()
    mp.setattr(tvin, "_verify_archive", lambda *a, **k: None)  # the fakes cannot have the real md5
    try:
        truth = {}
        for split in ("train", "val"):
            ds = tvin.ImageNet(str(tv), split=split)
            full_order = sorted(tvin.load_meta_file(str(tv))[0])  # the 1000 leaf wnids of meta.mat
            assert len(full_order) == 1000
            for path, target in ds.imgs:
                wnid = ds.wnids[target]
                truth[sha(Path(path).read_bytes())] = (wnid, full_order.index(wnid), split)
    finally:
        mp.undo()
    assert sum(v[2] == "train" for v in truth.values()) == 20 and sum(v[2] == "val" for v in truth.values()) == 10
    return truth


FORMS = {
    "train-tar": ("ILSVRC2012_img_train.tar", ["--split", "train"]),
    "train-root": (".", ["--split", "train"]),
    "train-parquet": ("data", ["--split", "train"]),
    "val-tar-devkit": ("ILSVRC2012_img_val.tar", ["--split", "val", "--labels", "ILSVRC2012_devkit_t12.tar.gz"]),
    "val-tar-kaggle": ("ILSVRC2012_img_val.tar", ["--split", "val", "--labels", "LOC_val_solution.csv"]),
    "val-root": (".", ["--split", "val"]),
    "val-parquet": ("data", ["--split", "val"]),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_label_equals_torchvision(dist, torchvision_truth, tmp_path, form):
    root, made = dist
    src, args = FORMS[form]
    args = [a if not a.endswith((".gz", ".csv")) else str(root / a) for a in args]
    out = tmp_path / "out"
    assert prep(root / src, out, "--allow-partial", "--resolution", "keep", *args) == 0
    got = samples(out)
    split = "val" if "--split" in args and args[args.index("--split") + 1] == "val" else "train"
    assert len(got) == (10 if split == "val" else 20)
    manifest = read_manifest(out)
    assert manifest["num_classes"] == 1000 and [c["id"] for c in manifest["classes"]] == list(ILSVRC2012_WNIDS)
    assert sorted(manifest["source"]["missing_classes"]) == sorted(set(ILSVRC2012_WNIDS) -
                                                                   {ILSVRC2012_WNIDS[c] for c in CLASSES})
    for key, data, label in got:  # originals are stored byte for byte: the bytes name the image
        wnid, tv_label, tv_split = torchvision_truth[sha(data)]
        assert tv_split == split
        assert label == tv_label == WNID_TO_INDEX[wnid], (form, key, wnid, label)
    assert sorted(label for _, _, label in got) == sorted(v[1] for v in torchvision_truth.values() if v[2] == split)


def test_devkit_ids_are_not_the_standard_order(dist):
    """The devkit's ILSVRC2012_ID order differs from sorted wnids, so the mapping above was exercised."""
    _, made = dist
    ids = made["devkit_ids"]
    assert sum(ids[w] - 1 == i for i, w in enumerate(ILSVRC2012_WNIDS)) < 10
    from scipy.io import loadmat
    with tarfile.open(dist[0] / "ILSVRC2012_devkit_t12.tar.gz") as tar:
        meta = loadmat(io.BytesIO(tar.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()),
                       squeeze_me=True)["synsets"]
    assert meta.dtype.names[:5] == ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children")
    assert len(meta) == 1003 and sum(int(s["num_children"]) == 0 for s in meta) == 1000


def test_declared_classes_train_and_val_agree(dist, tmp_path):
    root, _ = dist
    declared = "n02130308,n01440764,n02085620,n01514668"  # not in standard order on purpose
    assert prep(root / "ILSVRC2012_img_train.tar", tmp_path / "tr", "--classes", declared, "--resolution", "16") == 0
    assert prep(root / "ILSVRC2012_img_val.tar", tmp_path / "va", "--split", "val", "--classes", declared,
                "--labels", str(root / "ILSVRC2012_devkit_t12.tar.gz"), "--resolution", "16") == 0
    assert prep(root / "data", tmp_path / "pq", "--split", "val", "--classes", declared, "--resolution", "16") == 0
    mt, mv, mp = (read_manifest(tmp_path / n) for n in ("tr", "va", "pq"))
    assert mt["classes"] == mv["classes"] == mp["classes"]
    assert [c["id"] for c in mt["classes"]] == ["n01440764", "n01514668", "n02085620", "n02130308"]
    assert [c["source_index"] for c in mt["classes"]] == [0, 7, 151, 293] and mt["num_classes"] == 4
    assert sorted(set(label for _, _, label in samples(tmp_path / "tr"))) == [0, 1, 2, 3]
    assert len(samples(tmp_path / "tr")) == 16 and len(samples(tmp_path / "va")) == 8  # toilet tissue left out
    # the dogs-and-cats preset keeps the ILSVRC order 151..293 as 0..142
    assert prep(root / "ILSVRC2012_img_train.tar", tmp_path / "dc", "--classes", "dogs_and_cats",
                "--allow-partial", "--resolution", "16") == 0
    dc = read_manifest(tmp_path / "dc")
    assert [c["source_index"] for c in dc["classes"]] == list(range(151, 294))
    assert [c["id"] for c in dc["classes"]] == preset_wnids("dogs_and_cats")
    assert sorted(set(label for _, _, label in samples(tmp_path / "dc"))) == [0, 142]


def test_partial_sources_are_refused_naming_what_is_missing(dist, tmp_path, capsys):
    root, _ = dist
    # no declaration: 995 classes missing -> exit 2, one line, abbreviated list
    assert prep(root / "ILSVRC2012_img_train.tar", tmp_path / "a") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lacks 995 of the 1000 ILSVRC-2012 classes" in err
    assert "n01443537" in err and "(989 more)" in err and "--allow-partial" in err
    assert not (tmp_path / "a").exists()
    # a declared class that is absent is named
    assert prep(root / "ILSVRC2012_img_train.tar", tmp_path / "b", "--classes", "n01440764,n01443537") == 2
    err = capsys.readouterr().err
    assert "lacks 1 of the 2 classes declared" in err and "n01443537" in err
    # an interrupted extraction: class folders beside unextracted class tars
    train = tmp_path / "ILSVRC" / "train"
    train.mkdir(parents=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar") as outer:
        outer.extractall(train)
    for tar in sorted(train.glob("*.tar"))[:3]:
        with tarfile.open(tar) as inner:
            inner.extractall(train / tar.stem)
        tar.unlink()
    assert prep(tmp_path / "ILSVRC", tmp_path / "c", "--allow-partial") == 2
    err = capsys.readouterr().err
    left = sorted(p.name for p in train.glob("*.tar"))
    assert len(left) == 2 and all(name in err for name in left) and "not extracted" in err
    # the outer tar unpacked only (train/n*.tar): read as archives, standard labels
    shutil.rmtree(train)
    train.mkdir()
    with tarfile.open(root / "ILSVRC2012_img_train.tar") as outer:
        outer.extractall(train)
    assert prep(tmp_path / "ILSVRC", tmp_path / "d", "--allow-partial", "--resolution", "16") == 0
    assert sorted(set(label for _, _, label in samples(tmp_path / "d"))) == list(CLASSES)
    # a mislabelled parquet (labels not in sorted-wnid order) is refused
    import pyarrow.parquet as pq
    bad = tmp_path / "badpq"
    bad.mkdir()
    table = pq.read_table(root / "data" / "train-00000-of-00002.parquet")
    labels = table.column("label").to_numpy()
    pq.write_table(table.set_column(1, "label", [np.where(labels == 7, 8, labels)]), bad / "train-00000-of-00001.parquet")
    assert prep(bad, tmp_path / "e", "--allow-partial") == 2
    err = capsys.readouterr().err
    assert "does not use the standard sorted-wnid class order" in err and "n01514668" in err


def test_min_size_drops_small_images_and_counts_them(dist, tmp_path):
    root, made = dist
    assert prep(root / "ILSVRC2012_img_train.tar", tmp_path / "o", "--allow-partial", "--resolution", "32",
                "--min-size", "64") == 0
    m = read_manifest(tmp_path / "o")
    small = [n for n, _ in made["train"] if min(Image.open(io.BytesIO(made["train_bytes"][n])).size) < 64]
    assert len(small) == 4 and min(h for h, w in SIZES) == 40  # one of the five shapes is 40 px high
    assert m["min_size"]["side"] == 64 and m["min_size"]["dropped"] == len(small)
    assert sorted(i["source"].rsplit(":", 1)[1] for i in m["min_size"]["items"]) == sorted(small)
    assert all(i["size"] == "120x40" for i in m["min_size"]["items"])
    assert m["num_samples"] == 20 - len(small) == len(samples(tmp_path / "o"))
    assert prep(root / "ILSVRC2012_img_train.tar", tmp_path / "p", "--min-size", "-1", "--allow-partial") == 2


@pytest.mark.slow
def test_imagenet128_trains_two_steps_on_shards_from_the_train_archive(dist, tmp_path):
    """The imagenet128 experiment (1000 classes, resnet128, projection D) reads what the archive gave."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    root, _ = dist
    assert prep(root, tmp_path / "in128", "--allow-partial", "--resolution", "128") == 0
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "trainer", "main.py"), "--exp", "imagenet128",
                           "--out", str(run), f"data.path={tmp_path / 'in128'}", "train.steps=2", "train.n_dis=1",
                           "train.batch_size=4", "train.g_batch_size=4", "model.ch=4", "model.bn_world=1",
                           "train.precision=fp32", "train.channels_last=false", "train.log_every=1",
                           "train.progress=false", "data.num_workers=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [x["step"] for x in lines if "step" in x and "loss/d" in x]
    assert steps[-1] == 2 and all(np.isfinite(x["loss/d"]) for x in lines if "loss/d" in x)
