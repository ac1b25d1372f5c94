"""Sample grids of an exported generator: ``python -m eval.analysis.grids GENERATOR_OR_CKPT --out DIR``.

Kinds (``--kind``, default all three):

- ``classes``: one row per class, ``--cols`` samples each (an unconditional G: ``--rows`` rows of
  samples). Sample j of class c uses the evaluator's noise for (seed, c, j)
  (``eval.generate.sample_noise``), so the grid shows samples that the FID evaluation also draws.
- ``interp``: latent interpolation, one row per pair of noise vectors, ``--steps`` points on the
  great circle between them (spherical interpolation, which keeps the points at the typical norm
  of a Gaussian ``z``; ``--linear`` for straight lines). Rows of a conditional G cycle through the
  classes, each row at a fixed class.
- ``morph``: class morphing (Miyato & Koyama 2018, Fig. 10-11 style): one row per fixed ``z``; from
  left to right the conditional BN's per-class gain and bias are interpolated from class A to
  class B, ``gamma = (1 - t) gamma[A] + t gamma[B]`` (likewise beta) in every G block. ``z`` is
  held fixed, so what changes is only the class. Done with forward hooks on the embeddings
  (:func:`class_mixture`); the model code is unchanged.

Inputs: an exported ``generator.safetensors``, a checkpoint folder, or a run folder (its newest
checkpoint). Writes ``DIR/classes.png``, ``DIR/interp.png``, ``DIR/morph.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script path: the repository root on sys.path, not this folder (ARCHITECTURE.md)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(os.path.dirname(_HERE))] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch
import torchvision
from torch import nn
from trainer.errors import UsageError, exit_code_of, report

KINDS = ("classes", "interp", "morph")


def load(path: str, which: str = "auto", device="cpu") -> Tuple[nn.Module, dict]:
    """G (eval mode) and its meta from a generator file, a checkpoint folder or a run folder."""
    from eval.ckpt import CheckpointError, checkpoint_folder, resolve_generator
    from models.export import load_generator
    if not os.path.exists(path):
        raise CheckpointError(f"{path!r} does not exist; expected a generator.safetensors, a checkpoint "
                              "folder or a run folder")
    gen, _ = resolve_generator(checkpoint_folder(path))
    return load_generator(gen, which, device)


def num_classes_of(G: nn.Module) -> int:
    return int(getattr(G, "num_classes", 0) or 0)


@contextlib.contextmanager
def class_mixture(G: nn.Module, weights: torch.Tensor) -> Iterator[None]:
    """Inside, every conditional BN of ``G`` uses ``weights @ gamma`` / ``weights @ beta``.

    ``weights`` is ``[B, num_classes]`` (rows of class weights, e.g. ``(1 - t) e_A + t e_B``); call
    ``G(z, y)`` with any valid labels ``y`` of batch size B: the hooks replace the embedding
    lookups' outputs with the mixtures.
    """
    from models import ConditionalBatchNorm2d

    def replace(module, args, output):
        return weights.to(module.weight.device, module.weight.dtype) @ module.weight

    handles = []
    for m in G.modules():
        if isinstance(m, ConditionalBatchNorm2d) and m.num_classes > 0:
            if weights.shape[-1] != m.num_classes:
                raise ValueError(f"class weights have {weights.shape[-1]} columns; G has {m.num_classes} classes")
            handles += [m.gamma.register_forward_hook(replace), m.beta.register_forward_hook(replace)]
    if not handles:
        raise UsageError(f"{type(G).__name__} has no class-conditional BN: class morphing needs a conditional G")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of ``z0`` and ``z1`` at fractions ``t`` ([T]) -> [B, T, D]."""
    a, b = z0.unsqueeze(1), z1.unsqueeze(1)
    tt = t.view(1, -1, 1)
    cos = torch.nn.functional.cosine_similarity(z0, z1, dim=1).clamp(-1 + 1e-7, 1 - 1e-7).view(-1, 1, 1)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    return (torch.sin((1 - tt) * omega) / so) * a + (torch.sin(tt * omega) / so) * b


def lerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.view(1, -1, 1)
    return (1 - tt) * z0.unsqueeze(1) + tt * z1.unsqueeze(1)


@torch.no_grad()
def _run(G: nn.Module, z: torch.Tensor, y: Optional[torch.Tensor], batch: int = 100) -> torch.Tensor:
    dev = next(G.parameters()).device
    outs = []
    for i in range(0, z.shape[0], batch):
        yb = None if y is None else y[i:i + batch].to(dev)
        outs.append(G(z[i:i + batch].to(dev), yb).float().cpu())
    return torch.cat(outs)


def _noise(seed: int, n: int, z_dim: int, stream: int, z_dist: str = "normal") -> torch.Tensor:
    from models import sample_z
    g = torch.Generator().manual_seed(seed * 1000 + stream)
    return sample_z(n, z_dim, z_dist, generator=g)


def class_grid(G: nn.Module, classes: Optional[Sequence[int]], cols: int, rows: int, seed: int) -> torch.Tensor:
    """``[R * cols, 3, H, W]`` images in [-1, 1]: row r holds class ``classes[r]``."""
    from eval.generate import sample_noise
    k = num_classes_of(G)
    if k:
        classes = list(classes) if classes else list(range(k))
        cls = [c for c in classes for _ in range(cols)]
        within = [j for _ in classes for j in range(cols)]
        z = sample_noise(seed, cls, within, G.z_dim, getattr(G, "z_dist", "normal"))
        return _run(G, z, torch.tensor(cls))
    z = sample_noise(seed, [0] * (rows * cols), list(range(rows * cols)), G.z_dim,
                     getattr(G, "z_dist", "normal"))
    return _run(G, z, None)


def interpolation(G: nn.Module, rows: int, steps: int, seed: int, classes: Optional[Sequence[int]] = None,
                  spherical: bool = True) -> torch.Tensor:
    """``[rows * steps, 3, H, W]``: each row walks from one noise vector to another at a fixed class."""
    z0, z1 = (_noise(seed, rows, G.z_dim, k, getattr(G, "z_dist", "normal")) for k in (1, 2))
    t = torch.linspace(0, 1, steps)
    z = (slerp if spherical else lerp)(z0, z1, t).reshape(rows * steps, -1)
    k = num_classes_of(G)
    y = None
    if k:
        pool = list(classes) if classes else list(range(k))
        y = torch.tensor([pool[r % len(pool)] for r in range(rows)]).repeat_interleave(steps)
    return _run(G, z, y)


def morph(G: nn.Module, a: int, b: int, rows: int, steps: int, seed: int) -> torch.Tensor:
    """``[rows * steps, 3, H, W]``: fixed z per row, class weights moving from class ``a`` to ``b``."""
    k = num_classes_of(G)
    if k == 0:
        raise UsageError("class morphing needs a class-conditional generator; this one is unconditional")
    for c in (a, b):
        if not 0 <= c < k:
            raise UsageError(f"morph class {c} outside [0, {k})")
    z = _noise(seed, rows, G.z_dim, 3, getattr(G, "z_dist", "normal")).repeat_interleave(steps, dim=0)
    t = torch.linspace(0, 1, steps).repeat(rows)
    w = torch.zeros(rows * steps, k)
    w[:, a] += 1 - t
    w[:, b] += t
    y = torch.full((z.shape[0],), a)
    outs = []
    for i in range(0, z.shape[0], 100):  # the hooks' weights must match each G call's batch
        with class_mixture(G, w[i:i + 100]):
            outs.append(_run(G, z[i:i + 100], y[i:i + 100], batch=100))
    return torch.cat(outs)


def save_grid(images: torch.Tensor, path: str, nrow: int, scale: int = 1) -> None:
    x = (images.clamp(-1, 1) + 1) / 2
    if scale > 1:
        x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    torchvision.utils.save_image(torchvision.utils.make_grid(x, nrow=nrow, padding=1, pad_value=1.0), path)


def int_list(text: Optional[str], flag: str) -> Optional[List[int]]:
    """``"0,5"`` -> ``[0, 5]`` (None for an unset option); a clear error names the flag."""
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", metavar="GENERATOR_OR_CKPT",
                   help="generator.safetensors, checkpoint folder ckpt-<step>/ or run folder (newest checkpoint)")
    p.add_argument("--out", default="grids", help="output folder")
    p.add_argument("--kind", default="all", choices=(*KINDS, "all"), help="which grid(s) to draw")
    p.add_argument("--classes", default=None,
                   help="comma-separated classes (unset=%(default)s): rows of 'classes' and 'interp' (unset: "
                        "all); 'morph' goes from the first to the second (unset: 0,1)")
    p.add_argument("--cols", type=int, default=10, help="samples per class row ('classes')")
    p.add_argument("--rows", type=int, default=8, help="rows of 'interp' and 'morph' (and of 'classes' for "
                                                      "an unconditional G)")
    p.add_argument("--steps", type=int, default=10, help="interpolation points per row ('interp', 'morph')")
    p.add_argument("--linear", action="store_true", help="'interp': linear instead of spherical interpolation")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--which", default="auto", choices=("auto", "G", "G_ema"), help="weights (auto: EMA if present)")
    p.add_argument("--scale", type=int, default=1, help="enlarge the images this many times")
    args = p.parse_args(argv)
    for flag in ("cols", "rows", "steps", "scale"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    kinds = KINDS if args.kind == "all" else (args.kind,)
    try:
        classes = int_list(args.classes, "--classes")
        G, meta = load(args.path, args.which)
        k = num_classes_of(G)
        bad = [c for c in classes or [] if not 0 <= c < max(k, 1)]
        if k and bad:
            raise UsageError(f"--classes {bad} outside [0, {k})")
        os.makedirs(args.out, exist_ok=True)
        written = []
        for kind in kinds:
            path = os.path.join(args.out, f"{kind}.png")
            if kind == "classes":
                save_grid(class_grid(G, classes, args.cols, args.rows, args.seed), path, args.cols, args.scale)
            elif kind == "interp":
                save_grid(interpolation(G, args.rows, args.steps, args.seed, classes, not args.linear), path,
                          args.steps, args.scale)
            else:
                if k == 0 and args.kind == "all":
                    print("skipping morph: the generator is unconditional", file=sys.stderr)
                    continue
                pair = classes or [0, 1]
                if len(pair) < 2:
                    raise UsageError(f"--classes {args.classes!r}: morph needs two classes A,B")
                a, b = pair[:2]
                save_grid(morph(G, a, b, args.rows, args.steps, args.seed), path, args.steps, args.scale)
            written.append(path)
    except Exception as exc:
        if exit_code_of(exc) is None:
            raise  # a bug: its traceback, exit 1
        return report(exc)  # declared bad input: one line, exit 2
    print(f"{meta['name']} ({meta['which']}, {k or 'no'} classes): wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
