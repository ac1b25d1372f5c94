"""FFCV backend (optional extra): writer -> .beton -> loader; a clear message where ffcv is absent."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from data_pipelines import DataConfig, build_train_stream, fakedata
from data_pipelines.sources import open_source
from data_pipelines.writer import PrepareOptions, prepare

HAS_FFCV = importlib.util.find_spec("ffcv") is not None
needs_ffcv = pytest.mark.skipif(not HAS_FFCV, reason="ffcv is not installed (optional extra: tests/install_ffcv.sh)")
R = 24


def test_missing_ffcv_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # import ffcv now raises ImportError
    monkeypatch.setitem(sys.modules, "ffcv.loader", None)
    cfg = DataConfig(backend="ffcv", path=str(tmp_path))
    with pytest.raises(ImportError, match=r"libturbojpeg0-dev libopencv-dev.*pip install -e '\.\[ffcv\]'"):
        build_train_stream(cfg, batch_size=2)
    fakedata.make_imagefolder(tmp_path / "raw", ("a",), per_class=2, size=8)
    source = open_source("imagefolder", str(tmp_path / "raw"))
    with pytest.raises(ImportError, match="install_ffcv.sh"):
        prepare(source, tmp_path / "out", PrepareOptions(format="ffcv", progress=False))
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    if not HAS_FFCV:
        pytest.skip("ffcv is not installed (optional extra: tests/install_ffcv.sh)")
    root = tmp_path_factory.mktemp("ffcv")
    fakedata.make_imagenet(root / "raw", classes=(0, 1, 2), per_class=6, size=(30, 40), corrupt=True)
    source = open_source("imagenet", str(root / "raw"), "train", classes="n01440764,n01443537,n01484850")
    prepare(source, root / "wds", PrepareOptions(resolution=R, samples_per_shard=5, progress=False))
    manifest = prepare(source, root / "ffcv", PrepareOptions(format="ffcv", resolution=R, samples_per_shard=5,
                                                               workers=1, progress=False))
    return root, source, manifest


def cfg_for(path, **kw):
    return DataConfig(**{"backend": "ffcv", "path": str(path), "resolution": R, "num_workers": 1, **kw})


@needs_ffcv
def test_beton_manifest_and_same_pixels_as_the_shards(beton):
    root, source, manifest = beton
    assert manifest["format"] == "ffcv" and manifest["num_samples"] == 18 and manifest["skipped"]["count"] == 1
    assert manifest["beton"]["name"] == "data.beton" and (root / "ffcv" / "data.beton").is_file()
    assert not (root / "ffcv" / ".ffcv-staging").exists()
    from ffcv.reader import Reader
    reader = Reader(str(root / "ffcv" / "data.beton"))
    assert reader.num_samples == 18
    # The .beton stores the shards' JPEG bytes unchanged: both backends give the same images, up to
    # the decoders' IDCT rounding (FFCV calls libturbojpeg with its fast flags).
    stream = build_train_stream(cfg_for(root / "ffcv"), batch_size=18, rank=0, world_size=1, seed=0)
    images, labels = next(iter(stream))
    wds = build_train_stream(DataConfig(backend="webdataset", path=str(root / "wds"), resolution=R, num_workers=0,
                                        shuffle_buffer=1), batch_size=18, rank=0, world_size=1, seed=0)
    w_images, w_labels, _ = next(wds.iter_epoch(0))
    unmatched = list(range(18))
    for x, y in zip(images.float(), labels.tolist()):
        errs = {j: (x - w_images[j].float()).abs().mean().item() for j in unmatched if w_labels[j] == y}
        best = min(errs, key=errs.get)
        assert errs[best] < 2.0
        unmatched.remove(best)
    assert not unmatched


@needs_ffcv
def test_ranks_disjoint_epochs_reshuffled_resume_exact(beton):
    root, _, _ = beton
    cfg = cfg_for(root / "ffcv")
    per_rank = []
    for rank in range(2):
        stream = build_train_stream(cfg, batch_size=3, rank=rank, world_size=2, seed=5)
        assert stream.num_classes == 3 and stream.batches_per_epoch == 3
        it = iter(stream)
        batches = [next(it) for _ in range(7)]  # > 2 epochs
        assert all(x.shape == (3, 3, R, R) and x.dtype == torch.uint8 and x.is_contiguous() for x, _ in batches)
        assert all(y.dtype == torch.int64 and y.shape == (3,) for _, y in batches)
        per_rank.append(batches)
        resumed = build_train_stream(cfg, batch_size=3, rank=rank, world_size=2, seed=5, start_batch=4)
        again = iter(resumed)
        for k in range(3):
            x, y = next(again)
            assert torch.equal(x, batches[4 + k][0]) and torch.equal(y, batches[4 + k][1])
        assert resumed.state_dict() == {"batches": 7, "skipped": 0}
    # Within an epoch the two ranks see different images (9 each of 18, none shared).
    key = lambda x: x.flatten().numpy().tobytes()  # noqa: E731
    epoch0 = [{key(x) for b in per_rank[r][:3] for x in b[0]} for r in range(2)]
    assert len(epoch0[0]) == 9 and len(epoch0[1]) == 9 and not epoch0[0] & epoch0[1]
    epoch1 = {key(x) for b in per_rank[0][3:6] for x in b[0]}
    assert epoch1 != epoch0[0]  # a new order each epoch
    # Buffers are not reused under the caller: an early batch is unchanged after more were drawn.
    first = per_rank[0][0][0]
    assert np.ptp(first.float().numpy()) > 0


@needs_ffcv
def test_bare_beton_file_and_augmentation(beton):
    root, _, _ = beton
    path = root / "ffcv" / "data.beton"
    stream = build_train_stream(cfg_for(path, resolution=16, random_flip=True),
                                batch_size=4, rank=0, world_size=1, seed=0)
    x, y = next(iter(stream))
    assert x.shape == (4, 3, 16, 16) and stream.num_classes == 3
