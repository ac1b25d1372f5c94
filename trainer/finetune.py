"""Fine-tuning is not resuming: ``train.init_from`` loads weights into a new run.

``train.init_from=PATH`` (an exported ``generator.safetensors``, a checkpoint folder, or a run
folder, which means its newest complete checkpoint) loads G, and D and G_ema where the source has
them, before the first step of a run that has no checkpoint of its own; optimizers, step, images
seen and the random streams start fresh. Tensors are matched by name and shape: with
``train.init_strict=true`` (the default) any difference (another number of classes, width or D
constraint) is refused with the differing tensors named; ``init_strict=false`` loads what matches
and lists what it skipped. A run that already has checkpoints resumes from them and ignores
``init_from``. Checkpoints are read verified and without unpickling code (trainer/safe_dcp.py).
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch
from torch import nn

from . import checkpoint


def _resolve(path: str) -> Tuple[str, str]:
    """``(kind, path)``: ("generator", file) or ("checkpoint", folder)."""
    if os.path.isfile(path):
        return "generator", path
    if os.path.isfile(os.path.join(path, checkpoint.META)):
        return "checkpoint", path
    found = checkpoint.list_checkpoints(os.path.join(path, "checkpoints"))
    if found:
        return "checkpoint", found[-1]
    raise checkpoint.CheckpointError(f"train.init_from={path!r} is neither a generator.safetensors file, a "
                                     f"checkpoint folder nor a run folder with a complete checkpoint")


def _compare(name: str, model: Dict[str, torch.Tensor], source: Dict[str, Tuple[int, ...]]) -> Tuple[List[str], List[str]]:
    """(keys to load, descriptions of the differences) for one module."""
    load, diffs = [], []
    for key, tensor in model.items():
        if key not in source:
            diffs.append(f"{name}.{key}: not in the source (model {tuple(tensor.shape)})")
        elif tuple(source[key]) != tuple(tensor.shape):
            diffs.append(f"{name}.{key}: source {tuple(source[key])} vs model {tuple(tensor.shape)}")
        else:
            load.append(key)
    diffs += [f"{name}.{key}: only in the source {tuple(shape)}" for key, shape in source.items() if key not in model]
    return load, diffs


def _fail_or_report(what: str, diffs: List[str], strict: bool) -> None:
    if diffs and strict:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise checkpoint.CheckpointError(f"train.init_from={what}: the weights do not fit this model ({shown}). "
                                         f"Use the same model settings, or train.init_strict=false to load what "
                                         f"matches and skip the rest")


def init_from(path: str, modules: Dict[str, nn.Module], strict: bool = True) -> List[str]:
    """Load ``modules`` (``{"G": G, "D": D, "G_ema": G_ema}``, absent ones omitted) from ``path``.

    Returns the lines to print: what was loaded and what was skipped.
    """
    kind, resolved = _resolve(path)
    lines = []
    if kind == "generator":
        from safetensors import safe_open
        from models.export import read_generator_meta
        try:
            read_generator_meta(resolved)
        except ValueError as exc:
            raise checkpoint.CheckpointError(str(exc)) from None
        with safe_open(resolved, framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            sources = {prefix: {k.split(".", 1)[1]: shapes[k] for k in keys if k.startswith(prefix + ".")}
                       for prefix in ("G", "G_ema")}
            wanted = {}
            diffs_all = []
            for name in ("G", "G_ema"):
                if name not in modules or not sources[name]:
                    continue
                load, diffs = _compare(name, modules[name].state_dict(), sources[name])
                diffs_all += diffs
                wanted[name] = load
            _fail_or_report(resolved, diffs_all, strict)
            for name, keys_to_load in wanted.items():
                state = modules[name].state_dict()
                with torch.no_grad():
                    for key in keys_to_load:
                        state[key].copy_(f.get_tensor(f"{name}.{key}"))
        loaded = list(wanted)
        if "D" in modules:
            lines.append(f"D starts from scratch ({os.path.basename(resolved)} holds only the generator)")
        skipped = diffs_all
    else:
        meta = checkpoint.verify(resolved)
        md = checkpoint._reader(resolved).read_metadata().state_dict_metadata
        request, skipped, loaded = {}, [], []
        for name, module in modules.items():
            prefix = f"state.{name}."
            source = {k[len(prefix):]: tuple(v.size) for k, v in md.items()
                      if k.startswith(prefix) and hasattr(v, "size")}
            if not source:
                continue
            load, diffs = _compare(name, module.state_dict(), source)
            skipped += diffs
            state = module.state_dict()
            request[name] = {k: state[k] for k in load}
            loaded.append(name)
        _fail_or_report(resolved, skipped, strict)
        checkpoint._dcp_load(resolved, {"state": request}, checkpoint._reader(resolved), "this model")
        lines.append(f"source: step {meta.get('step')} of {meta.get('exp')}")
    if "G_ema" in modules and "G_ema" not in loaded and "G" in loaded:
        modules["G_ema"].load_state_dict(modules["G"].state_dict())
        lines.append("G_ema starts as a copy of the loaded G")
    lines.insert(0, f"initialised {', '.join(loaded) or 'nothing'} from {resolved} (fresh optimizers, step 0)")
    if skipped:
        lines.append(f"skipped {len(skipped)} tensor(s) (train.init_strict=false): " + "; ".join(skipped[:10])
                     + (" ..." if len(skipped) > 10 else ""))
    return lines
