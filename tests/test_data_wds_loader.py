"""WebDataset loader: writer -> loader round trip across ranks x workers, determinism, resume, damage."""

import io
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import DataConfig, build_train_stream, fakedata, to_model_range
from data_pipelines.sources import open_source
from data_pipelines.tario import index_path
from data_pipelines.wds_loader import SlotPlan
from data_pipelines.writer import PrepareOptions, prepare

R = 24


@pytest.fixture(scope="module")
def imagenet_shards(tmp_path_factory):
    """Generated ImageNet-like train folder (with the real oddities) written as 24 px shards."""
    root = tmp_path_factory.mktemp("wds")
    fakedata.make_imagenet(root / "raw", classes=(0, 1, 2, 3), per_class=5, size=(30, 40))
    source = open_source("imagenet", str(root / "raw"), "train", classes="n01440764,n01443537,n01484850,n01491361")
    prepare(source, root / "shards", PrepareOptions(resolution=R, samples_per_shard=3, progress=False))
    return root / "shards", source


def cfg_for(path, **kw):
    base = dict(backend="webdataset", path=str(path), resolution=R, num_workers=2, shuffle_buffer=4)
    base.update(kw)
    return DataConfig(**base)


def reference(source, key):
    img = Image.open(source.files[int(key)]).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.resize((R, R), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def test_round_trip_every_sample_once_per_epoch_2_ranks_2_workers(imagenet_shards):
    path, source = imagenet_shards
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            stream = build_train_stream(cfg_for(path), batch_size=2, rank=rank, world_size=2, seed=3)
            assert stream.num_classes == 4 and stream.resolution == R
            for images, labels, keys in stream.iter_epoch(epoch):
                assert images.dtype == torch.uint8 and images.shape[1:] == (3, R, R)
                for img, label, key in zip(images, labels.tolist(), keys):
                    assert label == source.labels[int(key)]
                    err = (img.float() - reference(source, key).float()).abs().mean().item()
                    assert err < 6.0, (key, err)  # JPEG tolerance (q95, 4:4:4)
                    seen.append(key)
        assert sorted(seen) == sorted(f"{i:08d}" for i in range(len(source)))  # each once: 20 of 20


def test_fewer_shards_than_readers_still_covers_each_sample_once(tmp_path):
    fakedata.make_imagefolder(tmp_path / "raw", ("a", "b", "c"), per_class=3, size=R)
    source = open_source("imagefolder", str(tmp_path / "raw"))
    prepare(source, tmp_path / "one", PrepareOptions(samples_per_shard=100, progress=False))  # a single shard
    plan = SlotPlan([9], n_slots=6, seed=0)  # 3 ranks x 2 workers read parts of the one shard
    assert plan.parts == 6 and sum(plan.slot_count(0, s) for s in range(6)) == 9
    seen = []
    for rank in range(3):
        stream = build_train_stream(cfg_for(tmp_path / "one"), batch_size=1, rank=rank, world_size=3, seed=0)
        seen += [k for _, _, keys in stream.iter_epoch(0) for k in keys]
    assert sorted(seen) == [f"{i:08d}" for i in range(9)]
    with pytest.raises(ValueError, match="cannot feed 12 readers"):
        build_train_stream(cfg_for(tmp_path / "one", num_workers=4), batch_size=1, rank=0, world_size=3, seed=0)


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_infinite_deterministic_and_resume_exact(imagenet_shards):
    path, _ = imagenet_shards
    cfg = cfg_for(path)
    # 20 samples, 2 ranks x 2 workers, batch 2: about 2-3 batches per worker-epoch; 9 batches cross epochs.
    a = take(build_train_stream(cfg, batch_size=2, rank=1, world_size=2, seed=7), 9)
    b = take(build_train_stream(cfg, batch_size=2, rank=1, world_size=2, seed=7), 9)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    # Workers reuse a ring of shared buffers: batches held by the caller must not change later.
    held, sums = [], []
    it = iter(build_train_stream(cfg, batch_size=2, rank=1, world_size=2, seed=7))
    for _ in range(30):
        images, _ = next(it)
        held.append(images)
        sums.append(int(images.sum()))
    assert [int(x.sum()) for x in held] == sums
    other = take(build_train_stream(cfg, batch_size=2, rank=1, world_size=2, seed=8), 9)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, other))
    stream = build_train_stream(cfg, batch_size=2, rank=1, world_size=2, seed=7, start_batch=5)
    resumed = take(stream, 4)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a[5:], resumed))
    assert stream.state_dict()["batches"] == 9
    # num_workers=0 loads in the training process with the same contract.
    inproc = take(build_train_stream(cfg_for(path, num_workers=0), batch_size=5, rank=0, world_size=1, seed=0), 6)
    assert all(x.shape == (5, 3, R, R) and y.dtype == torch.int64 for x, y in inproc)
    x = to_model_range(inproc[0][0])
    assert x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0


def test_augmentation_resumes_exactly_and_on_the_fly_resize(imagenet_shards):
    path, _ = imagenet_shards
    cfg = cfg_for(path, random_flip=True, random_crop_ratio=0.8)
    augmented = take(build_train_stream(cfg, batch_size=4, rank=0, world_size=1, seed=1), 8)
    assert all(x.shape == (4, 3, R, R) for x, _ in augmented)
    plain = take(build_train_stream(cfg_for(path), batch_size=4, rank=0, world_size=1, seed=1), 8)
    assert [y.tolist() for _, y in plain] == [y.tolist() for _, y in augmented]  # same samples ...
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(plain, augmented))  # ... augmented
    # Flips and crops are a function of the sample's stream position: a resume reproduces them.
    resumed = take(build_train_stream(cfg, batch_size=4, rank=0, world_size=1, seed=1, start_batch=5), 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(augmented[5:], resumed))
    small = take(build_train_stream(cfg_for(path, resolution=16, num_workers=0), batch_size=4, rank=0,
                                    world_size=1, seed=1), 2)
    assert all(x.shape == (4, 3, 16, 16) for x, _ in small)
    with pytest.raises(ValueError, match="random_crop_ratio"):
        build_train_stream(cfg_for(path, random_crop_ratio=0.0), batch_size=4, rank=0, world_size=1, seed=1)


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(imagenet_shards, tmp_path, caplog):
    path, _ = imagenet_shards
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    # Shard 0: overwrite the first image with bytes that are not a JPEG (index still points at it).
    idx = np.load(index_path(damaged / "shard-000000.tar"))
    raw = bytearray((damaged / "shard-000000.tar").read_bytes())
    offset, size = int(idx[0, 0]), int(idx[0, 1])
    raw[offset:offset + size] = b"\x00" * size
    (damaged / "shard-000000.tar").write_bytes(bytes(raw))
    # Shard 1: truncated in the middle of its second sample (its index is now inconsistent).
    data = (damaged / "shard-000001.tar").read_bytes()
    idx1 = np.load(index_path(damaged / "shard-000001.tar"))
    (damaged / "shard-000001.tar").write_bytes(data[: int(idx1[1, 0]) + 10])
    seen = []
    skipped = 0
    with caplog.at_level(logging.WARNING, logger="data_pipelines.wds"):
        for rank in range(2):
            stream = build_train_stream(cfg_for(damaged, num_workers=0), batch_size=1, rank=rank, world_size=2,
                                        seed=0)
            seen += [k for _, _, keys in stream.iter_epoch(0) for k in keys]
            it = iter(stream)
            for _ in range(25):  # the infinite stream goes on past the damage
                images, _ = next(it)
                assert images.shape == (1, 3, R, R)
            skipped += stream.skipped
    assert len(seen) == 20 - 1 - 2 and len(set(seen)) == len(seen)  # 1 bad image, 2 samples cut off
    assert skipped >= 3
    assert any("skipping sample" in r.message for r in caplog.records)
    assert any("damaged" in r.message for r in caplog.records)


def test_skips_in_workers_reach_the_stream_counter(imagenet_shards, tmp_path):
    path, _ = imagenet_shards
    damaged = tmp_path / "bad"
    shutil.copytree(path, damaged)
    for shard in sorted(damaged.glob("*.tar"))[:3]:
        idx = np.load(index_path(shard))
        raw = bytearray(shard.read_bytes())
        offset, size = int(idx[0, 0]), int(idx[0, 1])
        raw[offset:offset + size] = b"\xff" * size
        shard.write_bytes(bytes(raw))
    stream = build_train_stream(cfg_for(damaged), batch_size=2, rank=0, world_size=1, seed=0)
    take(stream, 12)  # > 1 epoch of each worker
    assert stream.skipped >= 3


def test_shards_without_manifest_by_pattern(imagenet_shards, tmp_path):
    path, _ = imagenet_shards
    plain = tmp_path / "plain"
    plain.mkdir()
    for shard in sorted(path.glob("*.tar")):  # no manifest, no index sidecars
        shutil.copy(shard, plain / shard.name)
    n = len(list(plain.glob("*.tar")))
    for spec in (str(plain), str(plain / "shard-*.tar"), str(plain / f"shard-{{000000..{n - 1:06d}}}.tar")):
        stream = build_train_stream(cfg_for(spec), batch_size=4, rank=0, world_size=1, seed=0)
        assert stream.num_classes == 4
        keys = [k for _, _, ks in stream.iter_epoch(0) for k in ks]
        assert sorted(keys) == [f"{i:08d}" for i in range(20)]
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        build_train_stream(cfg_for(str(plain / "nothing-*.tar")), batch_size=4, rank=0, world_size=1, seed=0)


def test_wrong_backend_for_folder_is_explained(tmp_path):
    with pytest.raises(ValueError, match="data.path is empty"):
        build_train_stream(cfg_for(""), batch_size=1)
    fakedata.make_imagefolder(tmp_path / "raw", ("a",), per_class=2, size=8)
    (tmp_path / "x.jpg").write_bytes(io.BytesIO().getvalue())
    with pytest.raises(FileNotFoundError, match="neither manifest.json nor"):
        build_train_stream(cfg_for(tmp_path / "raw"), batch_size=1)


def test_official_crop_flip_and_dequantization_exact_values():
    """The projection paper's augmentation and pixel form on a fixed image, value by value."""
    from data_pipelines.wds_loader import fit_square
    img = torch.arange(3 * 10 * 10, dtype=torch.int64).reshape(3, 10, 10).remainder(256).to(torch.uint8)
    # crop 0.9 of the short side (10 -> 9): the official offsets are randint(0, 10 - 9 - 1) = 0 only
    for at in [(0.0, 0.0), (0.99, 0.99)]:
        out = fit_square(img, 9, 0.9, at)
        assert torch.equal(out, img[:, 0:9, 0:9])
    # 0.6 -> side 6: offsets 0..3 (4 positions); u = 0.5 -> 2, u = 0.99 -> 3
    assert torch.equal(fit_square(img, 6, 0.6, (0.5, 0.99)), img[:, 2:8, 3:9])
    # x/128 - 1 + U[0, 1/128): with the generator's draws, exactly
    px = torch.tensor([[[[0, 127, 128, 255]]]], dtype=torch.uint8).expand(1, 3, 1, 4).contiguous()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = to_model_range(px, "cpu", scale=128.0, dequantize=True, generator=g1)
    u = torch.rand(px.shape, generator=g2)
    torch.testing.assert_close(x, px.float() / 128 - 1 + u / 128, rtol=0, atol=0)
    assert x.min() >= -1.0 and x.max() < 1.0
    lo = px.float() / 128 - 1
    assert ((x >= lo) & (x < lo + 1 / 128)).all()          # each level its own interval of width 1/128
    # The default form: x/127.5 - 1, exactly -1 and 1 at the ends, no noise.
    torch.testing.assert_close(to_model_range(px, "cpu")[0, 0, 0], torch.tensor([-1.0, 127 / 127.5 - 1, 128 / 127.5 - 1, 1.0]))
