"""Finding and verifying the generator of a checkpoint, without importing the trainer.

``--ckpt`` is either a checkpoint folder written by the trainer
(``RUN_DIR/checkpoints/ckpt-<step:09d>/`` with ``generator.safetensors`` and ``meta.json``, which
is written last, so a folder without it is incomplete) or a bare exported
``generator.safetensors``; a run folder stands for its newest complete checkpoint
(:func:`checkpoint_folder`). For a folder, the generator file's sha256 must equal the one listed in
``meta.json``; a mismatch (truncated copy, file from another checkpoint) is refused by name.
"""

from __future__ import annotations

import glob
import json
import os
from typing import List, Tuple

from trainer.errors import BadInput

GENERATOR_FILE = "generator.safetensors"
META_FILE = "meta.json"
CKPT_GLOB = "ckpt-*"


class CheckpointError(BadInput, ValueError):
    """A checkpoint that is incomplete, corrupt or of another model."""


from data_pipelines.tario import sha256_file  # noqa: E402  (the one sha256-of-a-file helper)


def read_ckpt_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir}: no {META_FILE}, so the checkpoint is incomplete (still being "
                              "written, or the save was interrupted)")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{path}: has no 'files' table of checksums; not a checkpoint of this trainer")
    return meta


def checkpoint_folder(path: str) -> str:
    """``path`` itself, or for a run folder (one with ``checkpoints/``) its newest complete checkpoint."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, META_FILE)) \
            and os.path.isdir(os.path.join(path, "checkpoints")):
        found = complete_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path}: a run folder without a complete checkpoint "
                                  f"(no checkpoints/{CKPT_GLOB}/{META_FILE})")
        return found[-1]
    return path


def resolve_generator(path: str, verify: bool = True) -> Tuple[str, dict]:
    """``(generator.safetensors path, checkpoint meta or {})`` for a checkpoint folder or file."""
    if os.path.isdir(path):
        meta = read_ckpt_meta(path)
        gen = os.path.join(path, GENERATOR_FILE)
        if not os.path.isfile(gen):
            raise CheckpointError(f"{path}: has no {GENERATOR_FILE}")
        expected = meta["files"].get(GENERATOR_FILE)
        if expected is None:
            raise CheckpointError(f"{path}/{META_FILE}: lists no sha256 for {GENERATOR_FILE}")
        if verify:
            actual = sha256_file(gen)
            if actual != expected:
                raise CheckpointError(f"{gen}: sha256 {actual[:16]}... does not match {expected[:16]}... in "
                                      f"{META_FILE}; the file is truncated, corrupt or from another checkpoint")
        return gen, meta
    if os.path.isfile(path):
        return path, {}
    raise CheckpointError(f"--ckpt {path!r}: neither a checkpoint folder nor a generator.safetensors file")


def complete_checkpoints(run_dir: str) -> List[str]:
    """Checkpoint folders of a run that have their meta.json, oldest first."""
    found = glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", CKPT_GLOB))  # a path may hold [ ] * ?
    return sorted(p for p in found if os.path.isdir(p) and not p.endswith(".partial")
                  and os.path.isfile(os.path.join(p, META_FILE)))


def check_run_config(gen_meta: dict, ckpt_dir: str) -> None:
    """Refuse a checkpoint folder whose generator is not the model its run's config.yaml describes."""
    # realpath: RUN_DIR/best is a symlink to checkpoints/ckpt-<step>, whose run folder is two levels up.
    cfg_path = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(ckpt_dir))), "config.yaml")
    if not os.path.isfile(cfg_path):
        return
    import yaml
    with open(cfg_path) as fh:
        model = (yaml.safe_load(fh) or {}).get("model", {}) or {}
    kwargs = gen_meta.get("kwargs", {})
    pairs = {"generator": (model.get("g"), gen_meta.get("name")),
             "num_classes": (model.get("num_classes"), kwargs.get("num_classes", 0)),
             "z_dim": (model.get("z_dim"), kwargs.get("z_dim"))}
    bad = {k: v for k, v in pairs.items() if v[0] is not None and v[1] is not None and v[0] != v[1]}
    if bad:
        detail = ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in bad.items())
        raise CheckpointError(f"{ckpt_dir}: holds a generator of another model/config than {cfg_path} ({detail})")
