"""WebDataset shards read through webdataset's openers: a real HTTP server on 127.0.0.1 and pipe: commands.

Each test compares the remote stream with the same shards read from the local folder (same seed,
ranks, workers): the batches must be identical, and so must resumes, damage handling and training.
"""

import functools
import http.server
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY
from data_pipelines import DataConfig, build_train_stream, fakedata
from data_pipelines.sources import open_source
from data_pipelines.tario import ShardDamaged, build_shard, index_path, index_shard, key_at, stream_samples
from data_pipelines.verify import check_training_data
from data_pipelines.writer import PrepareOptions, prepare

R = 24


class _Quiet(http.server.SimpleHTTPRequestHandler):
    """A file server; under /cut/ it announces each file's full length but sends only half of
    shard-000002.tar and drops the connection (a transfer cut short)."""

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        if self.path.startswith("/cut/") and self.path.endswith("shard-000002.tar"):
            data = source.read()
            outputfile.write(data[:len(data) // 2])
            self.close_connection = True
            return
        super().copyfile(source, outputfile)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Shards written by prepare (20 samples, 7 shards of <= 3, 4 classes) in folders under one
    document root, served by a ThreadingHTTPServer on 127.0.0.1 (stopped when the module ends).

    ``with``: shards + manifest + index sidecars; ``plain``: the shards alone (counted at start-up).
    """
    root = tmp_path_factory.mktemp("remote")
    fakedata.make_imagenet(root / "raw", classes=(0, 1, 2, 3), per_class=5, size=(30, 40))
    classes = "n01440764,n01443537,n01484850,n01491361"
    prepare(open_source("imagenet", str(root / "raw"), "train", classes=classes), root / "www" / "with",
            PrepareOptions(resolution=R, samples_per_shard=3, progress=False))
    (root / "www" / "plain").mkdir()
    for shard in sorted((root / "www" / "with").glob("*.tar")):
        shutil.copy(shard, root / "www" / "plain" / shard.name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Quiet, directory=str(root / "www")))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    n = len(list((root / "www" / "with").glob("*.tar")))
    yield {"root": root / "www", "url": f"http://127.0.0.1:{server.server_address[1]}",
           "pattern": f"shard-{{000000..{n - 1:06d}}}.tar", "n": n}
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def cfg_for(path, **kw):
    base = dict(backend="webdataset", path=str(path), resolution=R, num_workers=2, shuffle_buffer=4)
    base.update(kw)
    return DataConfig(**base)


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def epoch_batches(path, rank, world, epoch, **kw):
    stream = build_train_stream(cfg_for(path, **kw), batch_size=2, rank=rank, world_size=world, seed=3)
    return list(stream.iter_epoch(epoch))


def test_http_stream_equals_local_2_ranks_2_workers(served, caplog):
    local, url = served["root"] / "with", f"{served['url']}/with/{served['pattern']}"
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            a, b = epoch_batches(local, rank, 2, epoch), epoch_batches(url, rank, 2, epoch)
            assert same_batches(a, b) and [k for *_, k in a] == [k for *_, k in b]
            seen += [k for *_, keys in b for k in keys]
        assert sorted(seen) == [f"{i:08d}" for i in range(20)]  # every sample once per epoch
    # The endless training stream (ring buffers, epochs crossed) is the same batch for batch.
    for rank in range(2):
        a = take(build_train_stream(cfg_for(local), batch_size=2, rank=rank, world_size=2, seed=7), 9)
        b = take(build_train_stream(cfg_for(url), batch_size=2, rank=rank, world_size=2, seed=7), 9)
        assert same_batches(a, b)
    # Shards without a manifest beside them are counted by streaming each once (and said so).
    with caplog.at_level(logging.WARNING, logger="data_pipelines.wds"):
        plain = build_train_stream(cfg_for(f"{served['url']}/plain/{served['pattern']}"), batch_size=2,
                                   rank=0, world_size=2, seed=7)
    with_manifest = build_train_stream(cfg_for(url), batch_size=2, rank=0, world_size=2, seed=7)
    assert plain.shards.counts == with_manifest.shards.counts and plain.num_classes == 4
    assert plain.stored_resolution == R and with_manifest.shards.manifest is not None
    assert "counting the samples of 7 remote shards" in caplog.text and "/plain/manifest.json" in caplog.text
    assert "not verified" in caplog.text
    assert same_batches(take(plain, 9), take(build_train_stream(cfg_for(local), batch_size=2, rank=0,
                                                                world_size=2, seed=7), 9))
    # The manifest's own URL names the shards as well.
    by_manifest = build_train_stream(cfg_for(f"{served['url']}/with/manifest.json"), batch_size=2, rank=1,
                                     world_size=2, seed=3)
    assert same_batches(list(by_manifest.iter_epoch(0)), epoch_batches(local, 1, 2, 0))


def test_http_resume_is_the_exact_continuation(served):
    url = f"{served['url']}/plain/{served['pattern']}"   # counted at start-up: the same counts each time
    cfg = cfg_for(url, random_flip=True, random_crop_ratio=0.8)
    whole = take(build_train_stream(cfg, batch_size=2, rank=1, world_size=2, seed=7), 11)
    for start in (5, 8):  # inside the second epoch of a worker, and later
        stream = build_train_stream(cfg, batch_size=2, rank=1, world_size=2, seed=7, start_batch=start)
        assert same_batches(take(stream, 11 - start), whole[start:])
        assert stream.state_dict()["batches"] == 11
    local = take(build_train_stream(cfg_for(served["root"] / "with", random_flip=True, random_crop_ratio=0.8),
                                    batch_size=2, rank=1, world_size=2, seed=7), 11)
    assert same_batches(local, whole)


def test_pipe_commands_and_fewer_shards_than_readers(served, tmp_path):
    local = served["root"] / "with"
    pipe = f"pipe:cat {local}/{served['pattern']}"
    for rank in range(2):
        streams = [build_train_stream(cfg_for(p), batch_size=2, rank=rank, world_size=2, seed=7) for p in (pipe, local)]
        assert same_batches(take(streams[0], 7), take(streams[1], 7))
    # One shard, 3 ranks x 2 workers: each slot streams the whole shard and keeps its own part.
    fakedata.make_imagefolder(tmp_path / "raw", ("a", "b", "c"), per_class=3, size=R)
    prepare(open_source("imagefolder", str(tmp_path / "raw")), tmp_path / "one",
            PrepareOptions(samples_per_shard=100, progress=False))
    seen = []
    for rank in range(3):
        stream = build_train_stream(cfg_for(f"pipe:cat {tmp_path}/one/shard-000000.tar"), batch_size=1, rank=rank,
                                    world_size=3, seed=0)
        assert stream.shards.manifest is not None  # pipe:cat .../manifest.json
        seen += [k for _, _, keys in stream.iter_epoch(0) for k in keys]
    assert sorted(seen) == [f"{i:08d}" for i in range(9)]


def test_truncated_and_corrupt_shards_on_the_server(served, caplog):
    damaged = served["root"] / "damaged"
    shutil.copytree(served["root"] / "with", damaged)  # manifest counts are those of the intact shards
    idx = np.load(index_path(damaged / "shard-000000.tar"))
    raw = bytearray((damaged / "shard-000000.tar").read_bytes())
    offset, size = int(idx[0, 0]), int(idx[0, 1])
    raw[offset:offset + size] = b"\x00" * size          # an image that is not a JPEG
    (damaged / "shard-000000.tar").write_bytes(bytes(raw))
    data = (damaged / "shard-000001.tar").read_bytes()
    idx1 = np.load(index_path(damaged / "shard-000001.tar"))
    (damaged / "shard-000001.tar").write_bytes(data[: int(idx1[1, 0]) + 10])  # cut in its second sample
    url = f"{served['url']}/damaged/{served['pattern']}"

    def read_all(path, ranks=2):
        seen, skipped = [], 0
        for rank in range(ranks):
            stream = build_train_stream(cfg_for(path, num_workers=0, verify="off"), batch_size=1, rank=rank,
                                        world_size=2, seed=0)
            seen += [k for _, _, keys in stream.iter_epoch(0) for k in keys]
            it = iter(stream)
            for _ in range(25):  # the endless stream goes on past the damage
                images, _ = next(it)
                assert images.shape == (1, 3, R, R)
            skipped += stream.skipped
        return seen, skipped

    with caplog.at_level(logging.WARNING, logger="data_pipelines.wds"):
        seen, skipped = read_all(url)
        assert (seen, skipped) == read_all(damaged)   # the same samples in the same order as locally
        assert len(seen) == 20 - 1 - 2 and len(set(seen)) == len(seen) and skipped >= 3
        text = caplog.text
        assert f"of {served['url']}/damaged/shard-000000.tar: " in text and "skipping sample 0000" in text
        assert f"{served['url']}/damaged/shard-000001.tar is damaged (member at byte" in text
        # A shard the manifest lists but the server no longer has (HTTP 404): skipped, named, counted.
        lost = [key_at(b, int(o)) for b in [(damaged / "shard-000004.tar").read_bytes()]
                for o in np.load(index_path(damaged / "shard-000004.tar"))[:, 0]]
        (damaged / "shard-000004.tar").unlink()
        caplog.clear()
        gone, skipped = read_all(url)
    assert sorted(gone) == sorted(set(seen) - set(lost)) and len(lost) == 3 and skipped >= 6
    assert f"cannot read shard {served['url']}/damaged/shard-000004.tar" in caplog.text
    assert "status 22" in caplog.text and "its 3 samples for this reader are skipped" in caplog.text
    # A connection dropped mid-shard (curl exit 18): the shard ends at its last intact sample.
    shutil.copytree(served["root"] / "with", served["root"] / "cut")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_pipelines.wds"):
        cut, skipped = read_all(f"{served['url']}/cut/{served['pattern']}")
    full = [key_at(b, int(o)) for b in [(served["root"] / "with" / "shard-000002.tar").read_bytes()]
            for o in np.load(index_path(served["root"] / "with" / "shard-000002.tar"))[:, 0]]
    lost = set(full) - set(cut)
    assert 1 <= len(lost) <= 3 and len(cut) == len(set(cut)) == 20 - len(lost) and skipped >= len(lost)
    assert sorted(set(cut) | lost) == [f"{i:08d}" for i in range(20)]   # only that shard's tail is lost
    assert "shard-000002.tar is damaged (transfer failed: the reader exited with status 18" in caplog.text


def test_stream_parser_agrees_with_the_local_parser_on_damage():
    """stream_samples over a stream cut or scribbled anywhere gives index_shard's samples, keys and damage."""
    rng = np.random.default_rng(0)
    writer, _ = build_shard([(f"{i:08d}", rng.bytes(int(rng.integers(1, 1500))), i % 5) for i in range(6)])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:  # long names, no label for one
        for i in range(4):
            key = f"{'d' * 120}{i}"
            for name, payload in ((f"{key}.jpg", bytes([i]) * (300 * i + 1)), (f"{key}.cls", b"%d" % i)):
                if i == 2 and name.endswith(".cls"):
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    gnu = buf.getvalue()

    def local(data):
        index, damage = index_shard(bytearray(data))
        rows = [(bytes(data[o:o + s]), s, y, j, key_at(data, o) if s else None) for o, s, y, j in index.tolist()]
        return rows, damage

    def streamed(data, chunk):
        out, damage = [], None
        try:
            for sample, (o, s, y, j) in stream_samples(io.BytesIO(data), chunk=chunk):
                out.append((bytes(sample[o:o + s]), s, y, j, key_at(sample, o) if s else None))
        except ShardDamaged as exc:
            damage = str(exc)
        return out, damage

    for data in (writer, gnu):
        assert streamed(data, 512) == local(data) and local(data)[1] is None
        for cut in list(range(0, len(data), 97)) + list(range(len(data) - 1030, len(data))):
            assert streamed(data[:cut], 700) == local(data[:cut]), cut
        for _ in range(60):
            bad = bytearray(data)
            at = int(rng.integers(len(data)))
            bad[at:at + 16] = rng.bytes(16)
            assert streamed(bytes(bad), 1 << 20) == local(bytes(bad)), at


def test_remote_path_errors_and_verify(served, tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot read shard .*nothing-0.tar.*status 22"):
        build_train_stream(cfg_for(f"{served['url']}/plain/nothing-{{0..1}}.tar"), batch_size=1)
    with pytest.raises(ValueError, match="pipe:aws s3 cp"):
        build_train_stream(cfg_for("s3://bucket/shard-{0..3}.tar"), batch_size=1)
    with pytest.raises(FileNotFoundError, match="cannot read .*/missing/manifest.json"):
        build_train_stream(cfg_for(f"{served['url']}/missing/manifest.json"), batch_size=1)
    # data.verify is for local folders: a URL or a pipe: command is left to the loader, no crash.
    for path in (f"{served['url']}/with/{served['pattern']}", f"pipe:cat {served['root']}/with/shard-000000.tar"):
        for level in ("quick", "full"):
            assert check_training_data(cfg_for(path, verify=level)) is None


@pytest.mark.slow
def test_trainer_trains_and_resumes_exactly_from_http_shards(tmp_path):
    """The real entry point on http:// shards: 4 steps at once == 2 steps, stop, 2 more (bitwise)."""
    fakedata.make_cifar10(tmp_path / "raw", per_batch=8, batches=5, test=2)
    prepare(open_source("cifar10", str(tmp_path / "raw"), "train"), tmp_path / "www",
            PrepareOptions(samples_per_shard=8, progress=False))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Quiet, directory=str(tmp_path / "www")))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000004}}.tar"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(out, steps):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "trainer", "main.py"), "--out", str(out), *TINY,
                               "data.backend=webdataset", f"data.path={url}", "data.resolution=32",
                               "data.num_workers=1", f"train.steps={steps}", "train.ckpt_every=2"],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    try:
        train(tmp_path / "a", 4)
        first = train(tmp_path / "b", 2)
        assert "not verified" in first.stderr
        resumed = train(tmp_path / "b", 4)
    finally:
        server.shutdown()
        server.server_close()
    assert "resumed from" in resumed.stdout and "ckpt-000000002" in resumed.stdout
    a, b = (load_ckpt(tmp_path / run / "checkpoints" / "ckpt-000000004") for run in ("a", "b"))
    assert a.keys() == b.keys() and len(a) > 20
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bitwise equal after resume: {different[:5]}"


def load_ckpt(path):
    """G, D (with SN buffers) and G_ema of a checkpoint, through the trainer's own loader."""
    from trainer.build import build_parts
    from trainer.checkpoint import load_modules
    from trainer.config import load_config
    parts = build_parts(load_config("default", TINY), torch.device("cpu"))
    load_modules(str(path), {"G": parts.G, "D": parts.D, "G_ema": parts.G_ema})
    return {f"{m}.{k}": v.clone() for m, mod in (("G", parts.G), ("D", parts.D), ("G_ema", parts.G_ema))
            for k, v in mod.state_dict().items()}
