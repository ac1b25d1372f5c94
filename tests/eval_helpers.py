"""Test helpers for eval/: tiny exported generators and checkpoint folders in the trainer's layout."""

import copy
import hashlib
import json
import os
import socket

import torch

import models
from models.export import save_generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_G = {"ch": 4, "z_dim": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_generator(path, num_classes=10, seed=0, name="cnn32"):
    """A small real architecture (cnn32) with random weights; G_ema differs from G."""
    torch.manual_seed(seed)
    kwargs = {"num_classes": num_classes, **TINY_G}
    g = models.build_generator(name, **kwargs)
    g_ema = copy.deepcopy(g)
    with torch.no_grad():
        for p in g_ema.parameters():
            p.mul_(0.9)
    save_generator(str(path), name, kwargs, {"G": g, "G_ema": g_ema}, info={"step": 0})
    return str(path)


def make_checkpoint(run_dir, step, num_classes=10, seed=0):
    """``RUN/checkpoints/ckpt-<step>/`` with generator.safetensors and a meta.json (written last)."""
    folder = os.path.join(str(run_dir), "checkpoints", f"ckpt-{step:09d}")
    os.makedirs(folder, exist_ok=True)
    gen = export_generator(os.path.join(folder, "generator.safetensors"), num_classes, seed)
    with open(gen, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    meta = {"format": "sngan-checkpoint/1", "step": step, "images_seen": step * 64,
            "files": {"generator.safetensors": digest}}
    with open(os.path.join(folder, "meta.json"), "w") as fh:
        json.dump(meta, fh)
    return folder


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "SNGAN_OFFLINE": "1"}
