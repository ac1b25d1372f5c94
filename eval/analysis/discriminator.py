"""A trained discriminator for analysis (spectra, nearest neighbours), rebuilt from a checkpoint.

Exported generators carry their own model spec; D lives only in the training checkpoint's DCP
``state/``. Its architecture comes from the ``model`` section of the checkpoint's ``meta.json``
(the resolved ``ModelConfig`` the trainer wrote), and the layer normalization from the D
constraint, exactly as the trainer built it (``trainer.build.discriminator_kwargs``). Weights are
loaded verified and weights-only (``trainer.checkpoint.load_modules``). This reads checkpoints; it
does not import the training loop.

A path may be a checkpoint folder (``RUN_DIR/checkpoints/ckpt-<step>/``) or a run folder, which
means its newest complete checkpoint.
"""

from __future__ import annotations

import os
from typing import Tuple

import torch
from torch import nn

from trainer.checkpoint import META, CheckpointError, list_checkpoints, load_modules, read_meta

__all__ = ["CheckpointError", "resolve_checkpoint", "load_discriminator"]


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder that ``path`` names: itself, or a run folder's newest complete one."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    ckpt_root = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpt_root):
        found = list_checkpoints(ckpt_root)
        if not found:
            raise CheckpointError(f"{path}: a run folder without a complete checkpoint "
                                  f"(no {ckpt_root}/ckpt-*/{META})")
        return found[-1]
    if os.path.isfile(path):
        raise CheckpointError(f"{path}: a file; the discriminator is only in a training checkpoint "
                              f"folder (RUN_DIR/checkpoints/ckpt-<step>/) or a run folder")
    raise CheckpointError(f"{path!r}: neither a checkpoint folder (with {META}) nor a run folder "
                          f"(with checkpoints/)")


def load_discriminator(path: str, device: str | torch.device = "cpu") -> Tuple[nn.Module, dict]:
    """``(D in eval mode, info)`` for a checkpoint or run folder.

    ``info``: ``ckpt`` (folder), ``step``, ``exp``, ``d`` (registry name), ``d_constraint``,
    ``kwargs`` (builder arguments), ``num_classes``.
    """
    import models
    from trainer.build import discriminator_kwargs
    from trainer.config import Config, ConfigError, set_key
    from trainer.regularizers import build_constraint

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    model = meta.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{ckpt}/{META}: has no 'model' section, so D cannot be rebuilt")
    cfg = Config()
    try:
        for key, value in model.items():
            set_key(cfg, f"model.{key}", value)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt}/{META}: model section does not fit this code ({exc})") from exc
    constraint = build_constraint(cfg.model.d_constraint)
    kwargs = discriminator_kwargs(cfg, constraint)
    D = models.build_discriminator(cfg.model.d, **kwargs)
    try:
        load_modules(ckpt, {"D": D})
    except CheckpointError:
        raise
    except Exception as exc:  # DCP: missing keys or wrong shapes
        raise CheckpointError(f"{ckpt}: D's weights do not load into {cfg.model.d} {kwargs} ({exc})") from exc
    info = {"ckpt": ckpt, "step": meta.get("step"), "exp": meta.get("exp"), "d": cfg.model.d,
            "d_constraint": cfg.model.d_constraint, "kwargs": kwargs,
            "num_classes": cfg.model.num_classes}
    return D.to(device).eval().requires_grad_(False), info
