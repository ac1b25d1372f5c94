"""Golden trajectories: our training iterations compute what the reference code computes.

Each fixture in tests/golden/fixtures/ is a run of a reference implementation (the official Chainer
code, pfnet-research/sngan_projection and chainer-gan-lib, or w86763777/pytorch-gan-collections behind
the seeds' comparison), recorded by tests/golden/make_official.py or make_seeds.py: initial weights
and SN vectors, every input, every loss, the final parameters. Our trainer, built from the fixture's
experiment with no extra flags, replays it through ``Loop._iteration`` in float64 and must agree to
1e-9 relative in every D and G loss and every final tensor. The second test changes one op of the
iteration (the power-iteration order, the update order, Adam's eps placement) and shows the
trajectory then leaves the reference by orders of magnitude more, so a change that alters the
computation fails here.
"""

import os

import pytest

from golden.harness import TOLERANCE, compare, fixture_paths, load_fixture, replay

FIXTURES = fixture_paths()


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(paths):
    return [os.path.basename(p)[:-4] for p in paths]


def test_fixtures_are_present():
    names = set(_ids(FIXTURES))
    assert {"official_sngan_hinge_resnet", "official_projection", "official_sngan_cnn"} <= names, names
    assert sum(n.startswith("seeds_") for n in names) == 7, names


@pytest.mark.parametrize("path", FIXTURES, ids=_ids(FIXTURES))
def test_reference_trajectory_is_reproduced(path):
    fx = load_fixture(path)
    diff = compare(fx, replay(fx))
    assert diff.within(), f"{fx.name} ({fx.meta['reference']}): {diff}"


# One op of the iteration changed at a time, and the fixtures each change applies to.
CHANGES = {
    "sn_order": (["model.sn_iteration=uv"], lambda m, cfg: cfg.model.d_constraint == "sn"),
    "update_order": (None, lambda m, cfg: True),
    "adam_eps": (None, lambda m, cfg: cfg.optim.name == "adam"),
}


def _change(name, cfg):
    if name == "update_order":
        return [f"train.update_order={'d_first' if cfg.train.update_order == 'g_first' else 'g_first'}"]
    if name == "adam_eps":
        return [f"optim.adam={'torch' if cfg.optim.adam == 'chainer' else 'chainer'}"]
    return CHANGES[name][0]


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("path", FIXTURES, ids=_ids(FIXTURES))
def test_one_changed_op_leaves_the_reference(path, change):
    from golden.harness import build_config
    fx = load_fixture(path)
    cfg = build_config(fx)
    if not CHANGES[change][1](fx.meta, cfg):
        pytest.skip(f"{change} does not apply to {fx.name}: the row has no spectral norm or no Adam to change")
    diff = compare(fx, replay(fx, extra=_change(change, cfg)))
    # The trajectory leaves the reference by far more than the tolerance: the test above would fail.
    assert max(diff.loss, diff.tensor) > 1e3 * TOLERANCE, f"{fx.name} with {change}: {diff}"
    assert not diff.within()
