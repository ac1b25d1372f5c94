"""Exported generators: G and G_ema weights plus the model spec, in one safetensors file.

This is what sampling, evaluation and analysis read; it needs no trainer code. The file holds
tensors ``G.<param>`` and ``G_ema.<param>`` (either may be absent) and string metadata:
``format`` (``sngan-generator/1``), ``name`` (registry name), ``kwargs`` (JSON of the builder's
keyword arguments) and ``info`` (JSON: step, images seen, experiment, ...).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .registry import build_generator

FORMAT = "sngan-generator/1"


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
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an exported sngan generator (format={meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return {"name": meta["name"], "kwargs": json.loads(meta["kwargs"]), "info": json.loads(meta["info"])}


def load_generator(path: str, which: str = "auto", device: str | torch.device = "cpu") -> Tuple[nn.Module, dict]:
    """Build the generator and load weights; ``which`` is ``G``, ``G_ema`` or ``auto`` (EMA if present).

    Returns ``(module in eval mode, meta)`` with ``meta["which"]`` saying which weights were loaded.
    """
    meta = read_generator_meta(path)
    tensors = load_file(path, device=str(device))
    prefixes = sorted({k.split(".", 1)[0] for k in tensors})
    if which == "auto":
        which = "G_ema" if "G_ema" in prefixes else "G"
    if which not in prefixes:
        raise ValueError(f"{path}: has no {which!r} weights; it holds {prefixes}")
    g = build_generator(meta["name"], **meta["kwargs"])
    state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(which + ".")}
    g.load_state_dict(state, strict=True)
    meta["which"] = which
    return g.to(device).eval(), meta
