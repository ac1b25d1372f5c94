"""--source imagefolder reads what torchvision's ImageFolder reads: images at any depth below each
class folder (``CLASS/images/*.JPEG``), in the same order with the same labels; the manifest
counts the images per class. ImageNet synset folders keep their one-level reading."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from data_pipelines import fakedata
from data_pipelines.prepare import main as prepare_main
from data_pipelines.sources import SourceError, open_source


def image(path: Path, index: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(fakedata.pattern(index, 12, 12)).save(path, format=fmt)


@pytest.fixture
def tree(tmp_path):
    """Class folders laid out as public ImageNet subsets are (n.../images/*.JPEG), mixed depths,
    upper-case extensions, a non-image file, names that sort differently as paths and as folders
    (``a`` / ``a-b`` / ``a/x``), and a symbolic link to a folder outside the tree."""
    root = tmp_path / "tree"
    k = 0
    for wnid in ("n01443537", "n01629819"):                  # Tiny-ImageNet style
        for j in range(3):
            k += 1
            image(root / wnid / "images" / f"{wnid}_{j}.JPEG", k)
        (root / wnid / f"{wnid}_boxes.txt").write_text("0 0 8 8\n")
    for rel in ("top.jpg", "a/x/deep.png", "a/y.PNG", "a-b/z.jpeg", "b/c/d/e/f.webp"):
        k += 1
        image(root / "cat" / rel, k, "PNG" if rel.lower().endswith((".png", ".webp")) else "JPEG")
    outside = tmp_path / "elsewhere" / "extra"
    image(outside / "linked.jpg", 99)
    os.symlink(outside, root / "cat" / "linked")
    k += 1
    image(root / "dog" / "d.bmp", k, "BMP")
    return root


def test_same_files_order_and_labels_as_torchvision(tree):
    theirs = ImageFolder(str(tree))
    ours = open_source("imagefolder", str(tree))
    assert [c.id for c in ours.classes] == theirs.classes == ["cat", "dog", "n01443537", "n01629819"]
    assert list(zip(ours.files, ours.labels.tolist())) == theirs.samples
    assert len(theirs.samples) == 6 + 6 + 1    # cat: 5 at various depths + 1 through the link
    assert os.path.join(str(tree), "n01443537", "images", "n01443537_0.JPEG") in ours.files
    assert os.path.join(str(tree), "cat", "linked", "linked.jpg") in ours.files
    assert not any(f.endswith(".txt") for f in ours.files)
    assert ours.describe()["per_class"] == [6, 1, 3, 3]


def test_prepare_writes_every_image_and_counts_per_class(tree, tmp_path):
    out = tmp_path / "out"
    assert prepare_main([str(tree), str(out), "--source", "imagefolder", "--workers", "0", "--quiet",
                         "--samples-per-shard", "5"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    theirs = ImageFolder(str(tree))
    counts = Counter(theirs.targets)
    assert manifest["num_samples"] == len(theirs.samples) == 13 and manifest["skipped"]["count"] == 0
    assert manifest["source"]["per_class"] == [counts[i] for i in range(len(theirs.classes))] == [6, 1, 3, 3]
    assert [c["id"] for c in manifest["classes"]] == theirs.classes
    # a class subset keeps the counts of the kept classes, in the new label order
    sub = open_source("imagefolder", str(tree), classes="n01629819,cat")
    assert [c.id for c in sub.classes] == ["cat", "n01629819"] and sub.describe()["per_class"] == [6, 3]


def test_a_class_without_images_at_any_depth_or_a_link_loop_is_refused(tree, tmp_path, capsys):
    (tree / "empty" / "images").mkdir(parents=True)
    (tree / "empty" / "images" / "readme.txt").write_text("no pictures")
    with pytest.raises(SourceError, match=r"class folder .*empty' holds no image files at any depth"):
        open_source("imagefolder", str(tree))
    assert prepare_main([str(tree), str(tmp_path / "o"), "--source", "imagefolder", "--quiet"]) == 2
    assert "holds no image files at any depth" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tree / "empty" / "images" / "readme.txt").unlink()
    image(tree / "empty" / "images" / "now.jpg", 5)
    os.symlink("../..", tree / "empty" / "images" / "up")      # empty/images/up -> the tree's root
    with pytest.raises(SourceError, match="links back to a folder above it"):
        open_source("imagefolder", str(tree))


def test_imagenet_synset_folders_are_read_one_level_deep_as_before(tmp_path):
    made = fakedata.make_imagenet(tmp_path / "in", classes=(0, 1), per_class=2, oddities=False)
    wnid_dir = Path(made["train"][0]).parent
    image(wnid_dir / "nested" / "extra.JPEG", 50)
    source = open_source("imagenet", str(tmp_path / "in"), classes="n01440764,n01443537")
    assert source.files == made["train"] and "per_class" not in source.describe()
