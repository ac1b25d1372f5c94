"""The shapes10 data draws the shapes it names, and eval.shape_check tells shapes from coloured blobs.

The data tests pin what a person sees (the class's colour inside, a dark background, the hole of a
ring, the empty corners of a cross) rather than pixel hashes, so a deliberate change of the drawing
keeps them meaningful. The classifier tests train the real classifier once (cached in a temporary
folder) and score real images (high), uniformly coloured discs and blurred shapes (near chance).
"""

import json
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from eval_helpers import export_generator, make_checkpoint

from data_pipelines.synthetic import COLOURS, NUM_CLASSES, SHAPES, _params, draw, render
from eval import shape_check


def test_params_are_a_pure_function_of_seed_and_index():
    batch = _params(0, [5, 900, 17, 49999])
    one_by_one = np.concatenate([_params(0, [i]) for i in (5, 900, 17, 49999)])
    assert np.array_equal(batch, one_by_one) and batch.dtype == np.float32 and batch.shape == (4, 8)
    many = _params(0, range(20000))
    assert 0.0 <= many.min() and many.max() < 1.0 and abs(float(many.mean()) - 0.5) < 0.01
    assert abs(float(np.corrcoef(many[:, 0], many[:, 1])[0, 1])) < 0.03       # columns independent
    assert not np.array_equal(_params(1, [5]), _params(0, [5]))


def test_render_draws_each_class_shape_in_its_colour():
    images, labels = render(range(200), 32, 0)
    again, _ = render([7, 3, 150], 32, 0)
    assert torch.equal(again, images[[7, 3, 150]]) and images.dtype == torch.uint8
    assert torch.equal(labels, torch.arange(200) % NUM_CLASSES)
    assert not torch.equal(render(range(10), 32, 1)[0], images[:10])
    x = images.float() / 255
    corner = x[:, :, :3, :3].mean(dim=(2, 3))                     # background: nearly black
    assert corner.max() < 0.25
    centre = x[:, :, 15:17, 15:17].mean(dim=(2, 3))
    diag = x[:, :, 9:11, 9:11].mean(dim=(2, 3))                   # inside the bounding box, off the axes
    for c in range(NUM_CLASSES):
        k = labels == c
        colour = torch.from_numpy(COLOURS[c])
        shape = SHAPES[c]
        if shape in (0, 1, 2, 3):                                  # filled at the centre, in its colour
            ratio = centre[k] / colour
            assert (ratio > 0.8).all() and (ratio < 1.05).all(), (c, ratio.min(), ratio.max())
        if shape == 4:                                             # ring: the centre is background
            assert (centre[k].max(1).values < 0.3).all(), c
        if shape == 3:                                             # cross: empty between the arms
            assert (diag[k].max(1).values < 0.3).all(), c
        if shape == 1:                                             # square: filled there
            assert (diag[k] / colour > 0.8).all(), c


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("shape_cache")
    old = os.environ.get("SNGAN_CACHE_DIR")
    os.environ["SNGAN_CACHE_DIR"] = str(root)
    yield shape_check.load_shape_net()
    if old is None:
        os.environ.pop("SNGAN_CACHE_DIR")
    else:
        os.environ["SNGAN_CACHE_DIR"] = old


def mean(acc):
    return float(np.mean(list(acc.values())))


def discs(n):
    """Uniformly coloured discs in each class's colour: what a colour-only generator paints."""
    labels = np.arange(n) % NUM_CLASSES
    img = draw(np.zeros(n, dtype=np.int64), COLOURS[labels], np.full((n, 3, 1, 1), 0.06, np.float32),
               np.full(n, 0.32), np.full(n, 0.5), np.full(n, 0.5), 32)
    return torch.from_numpy(np.rint(img * 255).astype(np.uint8)), torch.from_numpy(labels)


def test_real_shapes_score_high_and_blobs_near_chance(net):
    real = shape_check.real_accuracy(net, range(49000, 49500))
    assert sorted(real) == list(range(10)) and min(real.values()) >= 0.97
    assert mean(shape_check.shape_accuracy(net, *discs(200))) <= 0.3       # right only on the two circle classes
    images, labels = render(range(49000, 49300), 32, 0)
    blurred = TF.gaussian_blur(images.float(), [15, 15], [3.0, 3.0]).round().to(torch.uint8)
    assert mean(shape_check.shape_accuracy(net, blurred, labels)) <= 0.4
    grey = images.float().mean(1, keepdim=True).expand(-1, 3, -1, -1).round().to(torch.uint8)
    assert mean(shape_check.shape_accuracy(net, grey, labels)) >= 0.97        # colour is not what it reads


def test_cli_on_sample_batches_run_folders_and_bad_input(net, tmp_path, capsys):
    images, labels = render(range(48000, 48200), 32, 0)
    real_npz, blob_npz = tmp_path / "real.npz", tmp_path / "blobs.npz"
    np.savez(real_npz, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    d, dl = discs(200)
    np.savez(blob_npz, arr_0=d.permute(0, 2, 3, 1).numpy(), labels=dl.numpy())
    assert shape_check.main([str(real_npz), "--json", str(tmp_path / "real.json")]) == 0
    out = capsys.readouterr().out
    assert "red circle" in out and "lime ring" in out and "mean" in out
    real = json.loads((tmp_path / "real.json").read_text())
    assert real["mean_generated"] >= 0.97 and real["mean_real"] >= 0.97 and real["images"] == 200
    assert shape_check.main([str(blob_npz), "--json", str(tmp_path / "blobs.json")]) == 0
    assert json.loads((tmp_path / "blobs.json").read_text())["mean_generated"] <= 0.3

    run = tmp_path / "run"
    make_checkpoint(run, 10)                         # an untrained generator: no shapes
    assert shape_check.main([str(run), "--per-class", "20", "--json", str(tmp_path / "g.json")]) == 0
    untrained = json.loads((tmp_path / "g.json").read_text())
    assert untrained["images"] == 200 and untrained["mean_generated"] <= 0.5
    capsys.readouterr()

    assert shape_check.main([str(tmp_path / "missing.npz")]) == 2
    assert shape_check.main([str(real_npz), "--per-class", "0"]) == 2
    uncond = export_generator(tmp_path / "uncond.safetensors", num_classes=0)
    assert shape_check.main([uncond]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "missing.npz" in err[0] and "--per-class 0" in err[1] and "10 classes" in err[2]
