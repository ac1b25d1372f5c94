"""Exported generators: G and G_ema weights plus the model spec, in one safetensors file.

This is what sampling, evaluation and analysis read; it needs no trainer code. The file holds
tensors ``G.<param>`` and ``G_ema.<param>`` (either may be absent) and string metadata:
``format`` (``sngan-generator/1``), ``name`` (registry name), ``kwargs`` (JSON of the builder's
keyword arguments) and ``info`` (JSON: step, images seen, experiment, ...).

:func:`load_generator` and :func:`read_generator_meta` take that file, a checkpoint folder
(``ckpt-<step>/`` with ``meta.json`` and ``generator.safetensors``) or a run folder (its newest
complete checkpoint, i.e. the newest ``checkpoints/ckpt-*/`` with ``meta.json``, which the trainer
writes last): :func:`generator_file`. The sha256 check of a checkpoint's files belongs to the
evaluator (``eval/ckpt.py``); this module only finds the file, so it needs no trainer or eval code.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .registry import build_generator


class GeneratorFileError(ValueError):
    """A path that is not a usable generator file, checkpoint or run folder (bad input: the command
    lines map it to exit 2 through ``trainer/errors.py``; models/ imports nothing above it)."""

FORMAT = "sngan-generator/1"
GENERATOR_FILE = "generator.safetensors"
CKPT_META = "meta.json"
_CKPT_NAME = re.compile(r"^ckpt-(\d+)$")   # partial saves are ckpt-<step>.partial/ and never match


def complete_checkpoints(run_dir: str) -> List[str]:
    """``checkpoints/ckpt-<step>/`` folders of a run that have their meta.json, oldest first (by step)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", "ckpt-*")):  # [ ] * ? in a path
        m = _CKPT_NAME.match(os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, CKPT_META)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def generator_file(path: str) -> str:
    """The ``generator.safetensors`` that ``path`` stands for.

    A file is itself; a checkpoint folder (``meta.json`` and ``generator.safetensors``) gives its
    generator; a run folder (one with ``checkpoints/``) gives the generator of its newest complete
    checkpoint. Anything else is a ``ValueError`` that says what was expected.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    expected = (f"expected a {GENERATOR_FILE} file, a checkpoint folder (ckpt-<step>/ with {CKPT_META} and "
                f"{GENERATOR_FILE}) or a run folder (with checkpoints/)")
    if not os.path.exists(path):
        raise GeneratorFileError(f"{path!r} does not exist; {expected}")
    if not os.path.isdir(path):
        raise GeneratorFileError(f"{path!r} is neither a file nor a folder; {expected}")
    gen, meta = os.path.join(path, GENERATOR_FILE), os.path.join(path, CKPT_META)
    if os.path.isfile(meta):
        if not os.path.isfile(gen):
            raise GeneratorFileError(f"{path!r}: a checkpoint folder without {GENERATOR_FILE}")
        return gen
    if os.path.isdir(os.path.join(path, "checkpoints")):
        found = complete_checkpoints(path)
        if not found:
            raise GeneratorFileError(f"{path!r}: a run folder without a complete checkpoint (no "
                             f"checkpoints/ckpt-<step>/{CKPT_META}); has it saved one yet?")
        return generator_file(found[-1])
    if os.path.isfile(gen):
        raise GeneratorFileError(f"{path!r}: has {GENERATOR_FILE} but no {CKPT_META}, so it is an incomplete checkpoint "
                         f"(still being written, or the save was interrupted); pass the file itself to use it anyway")
    raise GeneratorFileError(f"{path!r}: a folder with neither {GENERATOR_FILE} + {CKPT_META} nor checkpoints/; {expected}")


def save_generator(path: str, name: str, kwargs: dict, modules: Dict[str, nn.Module],
                   info: Optional[dict] = None) -> None:
    """Write ``modules`` (e.g. ``{"G": g, "G_ema": g_ema}``) atomically to ``path``."""
    tensors = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
    meta = {"format": FORMAT, "name": name, "kwargs": json.dumps(kwargs, sort_keys=True),
            "info": json.dumps(info or {}, sort_keys=True)}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def read_generator_meta(path: str) -> dict:
    """Model name, builder kwargs and info of a generator file, checkpoint folder or run folder."""
    from safetensors import safe_open
    path = generator_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise GeneratorFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise GeneratorFileError(f"{path}: not an exported sngan generator (format={meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return {"name": meta["name"], "kwargs": json.loads(meta["kwargs"]), "info": json.loads(meta["info"])}


def load_generator(path: str, which: str = "auto", device: str | torch.device = "cpu") -> Tuple[nn.Module, dict]:
    """Build the generator and load weights; ``which`` is ``G``, ``G_ema`` or ``auto`` (EMA if present).

    ``path`` is a generator file, a checkpoint folder or a run folder (:func:`generator_file`).
    Returns ``(module in eval mode, meta)`` with ``meta["which"]`` saying which weights were loaded
    and ``meta["path"]`` the file they came from.
    """
    if which not in ("auto", "G", "G_ema"):
        raise GeneratorFileError(f"which={which!r}: expected 'auto', 'G' or 'G_ema'")
    path = generator_file(path)
    meta = read_generator_meta(path)
    tensors = load_file(path, device=str(device))
    prefixes = sorted({k.split(".", 1)[0] for k in tensors})
    if which == "auto":
        which = "G_ema" if "G_ema" in prefixes else "G"
    if which not in prefixes:
        raise GeneratorFileError(f"{path}: has no {which!r} weights; it holds {prefixes}")
    g = build_generator(meta["name"], **meta["kwargs"])
    state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(which + ".")}
    g.load_state_dict(state, strict=True)
    meta["which"], meta["path"] = which, path
    return g.to(device).eval(), meta
