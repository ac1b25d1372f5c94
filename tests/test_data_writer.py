"""Shard writer: sources in their real on-disk formats -> WebDataset shards + manifest."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from data_pipelines import fakedata
from data_pipelines.imagenet_classes import ILSVRC2012_WNIDS, preset_wnids
from data_pipelines.manifest import read_manifest
from data_pipelines.prepare import main as prepare_main
from data_pipelines.sources import SourceError, open_source, parse_class_list
from data_pipelines.tario import index_shard, read_shard, sha256_file
from data_pipelines.writer import PrepareError, PrepareOptions, prepare


def shard_samples(folder):
    """{key: (rgb uint8 HWC, label)} of every sample in a written folder."""
    out = {}
    for shard in read_manifest(folder)["shards"]:
        buf = read_shard(os.path.join(folder, shard["name"]))
        index, damage = index_shard(buf)
        assert damage is None
        for offset, size, label, _is_jpeg in index.tolist():
            key = bytes(buf[offset - 512:offset - 412]).split(b"\0")[0].decode().split(".")[0]
            img = np.asarray(Image.open(io.BytesIO(bytes(buf[offset:offset + size]))).convert("RGB"))
            out[key] = (img, label)
    return out


def close(a, b, tol=6.0):
    return a.shape == b.shape and np.abs(a.astype(float) - b.astype(float)).mean() < tol


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    made = fakedata.make_imagenet(root, classes=(0, 1, 2), per_class=3, corrupt=True, val_per_class=2)
    return root, made


def test_imagenet_train_real_world_files_and_manifest(imagenet, tmp_path):
    root, made = imagenet
    source = open_source("imagenet", str(root), "train", classes="n01440764,n01443537,n01484850")
    assert [c.id for c in source.classes] == list(ILSVRC2012_WNIDS[:3])
    assert [c.name for c in source.classes] == ["tench", "goldfish", "great white shark"]
    manifest = prepare(source, tmp_path, PrepareOptions(resolution=24, samples_per_shard=4, workers=2,
                                                        progress=False))
    # 9 good files (one grayscale, one CMYK, one PNG named .JPEG) + 1 truncated JPEG.
    assert manifest["num_samples"] == 9 and manifest["num_classes"] == 3
    assert manifest["skipped"]["count"] == 1
    assert manifest["skipped"]["items"][0]["source"].endswith("n01440764_999.JPEG")
    assert [s["samples"] for s in manifest["shards"]] == [4, 3, 2] or sum(s["samples"] for s in manifest["shards"]) == 9
    for shard in manifest["shards"]:
        assert sha256_file(tmp_path / shard["name"]) == shard["sha256"]
        assert (tmp_path / shard["index"]).is_file()
    assert manifest["resolution"] == 24 and manifest["source"]["kind"] == "imagenet"
    assert manifest["classes"][2] == {"index": 2, "id": "n01484850", "name": "great white shark", "source_index": 2}
    samples = shard_samples(str(tmp_path))
    assert len(samples) == 9
    for key, (img, label) in samples.items():
        path = source.files[int(key)]
        assert label == source.labels[int(key)]
        ref = Image.open(path)
        mode = ref.mode
        ref = ref.convert("RGB")
        side = min(ref.size)
        left, top = (ref.width - side) // 2, (ref.height - side) // 2
        ref = np.asarray(ref.resize((24, 24), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)))
        assert img.shape == (24, 24, 3), (path, mode)
        assert close(img, ref, tol=8.0), (path, mode)
    # The grayscale source really was grayscale, the PNG really a PNG: the oddities were exercised.
    modes = {Image.open(p).mode for p in made["train"] if not p.endswith("_999.JPEG")}
    formats = {Image.open(p).format for p in made["train"] if not p.endswith("_999.JPEG")}
    assert {"L", "CMYK", "RGB"} <= modes and formats == {"JPEG", "PNG"}


@pytest.mark.parametrize("labels", ["kaggle", "devkit"])
def test_imagenet_val_labels(tmp_path, labels):
    root = tmp_path / "in"
    fakedata.make_imagenet(root, classes=(5, 151, 293), per_class=1, oddities=False, val_per_class=2,
                           val_labels=labels)
    source = open_source("imagenet", str(root), "val", classes="n01496331,n02085620,n02130308")
    assert [c.source_index for c in source.classes] == [5, 151, 293]
    assert source.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert source.details["labels_file"].endswith(".csv" if labels == "kaggle" else "ground_truth.txt")


def test_keep_originals_stores_rgb_jpegs_unchanged(imagenet, tmp_path):
    root, made = imagenet
    source = open_source("imagenet", str(root), "train", classes="n01440764,n01443537,n01484850")
    prepare(source, tmp_path, PrepareOptions(resolution=None, samples_per_shard=100, progress=False))
    samples = shard_samples(str(tmp_path))
    for key, (img, _) in samples.items():
        ref = Image.open(source.files[int(key)])
        assert img.shape[:2] == (ref.height, ref.width)


def test_cifar10_pickles(tmp_path):
    fakedata.make_cifar10(tmp_path / "raw", per_batch=6, batches=5, test=4)
    source = open_source("cifar10", str(tmp_path / "raw"), "train")
    assert len(source) == 30 and source.classes[3].name == "cat"
    prepare(source, tmp_path / "out", PrepareOptions(samples_per_shard=8, progress=False))
    samples = shard_samples(str(tmp_path / "out"))
    assert len(samples) == 30
    for key, (img, label) in samples.items():
        i = int(key)
        assert label == i % 10
        assert close(img, fakedata.pattern(90_000 + i, 32, 32), tol=3.0)
    test = open_source("cifar10", str(tmp_path / "raw" / "cifar-10-batches-py"), "test")
    assert len(test) == 4


def test_stl10_binary_orientation_and_splits(tmp_path):
    fakedata.make_stl10(tmp_path / "raw", train=5, test=3, unlabeled=4)
    train = open_source("stl10", str(tmp_path / "raw"), "train")
    assert train.labels.tolist() == [0, 1, 2, 3, 4] and train.classes[7].name == "monkey"
    # The binary is column-major per channel; decoding it right gives back the generated picture.
    assert np.array_equal(train.pixels(2, 3)[0], fakedata.pattern(300_002, 96, 96))
    prepare(train, tmp_path / "out48", PrepareOptions(resolution=48, progress=False))
    img, label = shard_samples(str(tmp_path / "out48"))["00000001"]
    assert img.shape == (48, 48, 3) and label == 1
    ref = np.asarray(Image.fromarray(fakedata.pattern(300_001, 96, 96)).resize((48, 48), Image.Resampling.BICUBIC))
    assert close(img, ref, tol=4.0)
    unlabeled = open_source("stl10", str(tmp_path / "raw" / "stl10_binary"), "unlabeled")
    manifest = prepare(unlabeled, tmp_path / "unl", PrepareOptions(progress=False))
    assert manifest["num_classes"] == 0 and manifest["num_samples"] == 4
    assert {lab for _, lab in shard_samples(str(tmp_path / "unl")).values()} == {-1}


def test_dogs_and_cats_preset_and_class_subsets(tmp_path):
    wnids = preset_wnids("dogs_and_cats")
    assert len(wnids) == 143 and wnids[0] == "n02085620" and wnids[-1] == "n02130308"  # Chihuahua .. cheetah
    assert parse_class_list("dogs_and_cats") == wnids
    root = tmp_path / "in"
    fakedata.make_imagenet(root, classes=(150, 151, 200, 293, 294), per_class=2, oddities=False)
    with pytest.raises(SourceError, match="lacks 140 of the 143 classes declared"):
        open_source("imagenet", str(root), "train", classes="dogs_and_cats")  # only 3 of 143 present
    sub = open_source("imagenet", str(root), "train", classes="n02130308,n02085620")
    assert [c.source_index for c in sub.classes] == [151, 293]
    assert sub.labels.tolist() == [0, 0, 1, 1] and all("n02085620" in f or "n02130308" in f for f in sub.files)
    (tmp_path / "list.txt").write_text("# two classes\nn02099601 golden retriever\nn02085620\n")
    assert parse_class_list(f"@{tmp_path / 'list.txt'}") == ["n02099601", "n02085620"]
    fakedata.make_cifar10(tmp_path / "c", per_batch=10, batches=5, test=2)
    cats_dogs = open_source("cifar10", str(tmp_path / "c"), "train", classes="cat,dog")
    assert [c.name for c in cats_dogs.classes] == ["cat", "dog"] and set(cats_dogs.labels.tolist()) == {0, 1}
    assert len(cats_dogs) == 10 and cats_dogs.pixels(0, 10).shape == (10, 32, 32, 3)


def test_layout_errors_are_clear_and_happen_before_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SourceError, match="does not exist"):
        open_source("imagenet", str(tmp_path / "nope"), "train")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.jpg")
    with pytest.raises(SourceError, match="no synset sub-folders"):
        open_source("imagenet", str(flat), "train")
    with pytest.raises(SourceError, match="no class sub-folders"):
        open_source("imagefolder", str(flat), "train")
    tree = tmp_path / "tree"
    fakedata.make_imagefolder(tree, ("cat", "dog"), per_class=1)
    (tree / "empty").mkdir()
    with pytest.raises(SourceError, match="empty.*holds no image files"):
        open_source("imagefolder", str(tree), "train")
    with pytest.raises(SourceError, match="not ImageNet synset folders"):
        open_source("imagenet", str(tree), "train")
    with pytest.raises(SourceError, match="valid: train, test"):
        open_source("cifar10", str(tmp_path), "val")
    with pytest.raises(SourceError, match="missing"):
        open_source("cifar10", str(tree), "train")
    (tmp_path / "stl10_binary").mkdir()
    (tmp_path / "stl10_binary" / "train_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(SourceError, match="not a multiple of 27648"):
        open_source("stl10", str(tmp_path), "train")
    val = tmp_path / "val_only" / "val"
    val.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(val / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(SourceError, match="no labels file"):
        open_source("imagenet", str(val), "val")
    # The CLI reports the same errors with exit code 2 and writes nothing.
    assert prepare_main([str(tree), str(out), "--source", "imagefolder", "--quiet"]) == 2
    assert not out.exists()


def test_rerun_is_noop_resumes_or_refuses(tmp_path):
    src = tmp_path / "src"
    fakedata.make_imagefolder(src, ("a", "b", "c"), per_class=4, size=16)
    out = tmp_path / "out"
    source = open_source("imagefolder", str(src))
    opts = PrepareOptions(samples_per_shard=5, progress=False)
    first = prepare(source, out, opts)
    stamp = os.stat(out / "manifest.json").st_mtime_ns
    again = prepare(source, out, opts)  # same job: nothing is rewritten
    assert again["job"]["id"] == first["job"]["id"] and os.stat(out / "manifest.json").st_mtime_ns == stamp
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare(source, out, PrepareOptions(samples_per_shard=5, jpeg_quality=80, progress=False))
    # Simulate an interrupted run: job state present, manifest and last shard missing, a partial file left.
    (out / "manifest.json").unlink()
    (out / ".prepare-state").mkdir()
    (out / ".prepare-state" / "job.json").write_text(json.dumps(first["job"]["spec"], sort_keys=True))
    for s in first["shards"][:2]:
        (out / ".prepare-state" / f"{s['name']}.json").write_text(json.dumps({**s, "skipped": []}))
    (out / first["shards"][2]["name"]).unlink()
    (out / "shard-000002.tar.partial").write_bytes(b"truncated")
    resumed = prepare(source, out, opts)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in first["shards"]]
    assert not list(out.glob("*.partial")) and not (out / ".prepare-state").exists()
    replaced = prepare(source, out, PrepareOptions(samples_per_shard=12, overwrite=True, progress=False))
    assert [s["samples"] for s in replaced["shards"]] == [12] and sorted(p.name for p in out.glob("*.tar")) == [
        "shard-000000.tar"]


def test_cli_help_and_bad_values(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "data_pipelines.prepare", "--help"], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    assert res.returncode == 0
    help_text = " ".join(res.stdout.split())
    for text in ("--source", "--format", "--resolution", "--jpeg-quality", "--classes", "dogs_and_cats",
                 "--samples-per-shard", "--workers", "--overwrite", "(default: 95)", "(default: 1000)",
                 "(default: keep)", "(default: webdataset)"):
        assert text in help_text
    res = subprocess.run([sys.executable, "-m", "data_pipelines.prepare", "a", "b", "--source", "lsun"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 2 and "'lsun'" in res.stderr and "imagenet" in res.stderr
    res = subprocess.run([sys.executable, "-m", "data_pipelines.prepare", "a", "b", "--source", "cifar10",
                          "--resolution", "big"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 2 and "'big' is not a size" in res.stderr
    src = tmp_path / "src"
    fakedata.make_imagefolder(src, ("a", "b"), per_class=2, size=16)
    assert prepare_main([str(src), str(tmp_path / "o"), "--source", "imagefolder", "--quiet",
                         "--jpeg-quality", "101"]) == 2
