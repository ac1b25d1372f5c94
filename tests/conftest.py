"""Shared test settings: the repository root is importable and runs stay small."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# A tiny model that trains a step in well under a second on 2 CPU cores.
TINY = ["model.g_ch=8", "model.d_ch=8", "model.z_dim=16", "train.batch_size=8", "train.n_dis=1",
        "train.log_every=2", "train.sample_every=4", "train.progress=false"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add OpenMP overhead, which on a busy 2-core machine
    multiplied such a file's wall time by about 5. Results do not depend on it. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
