"""Singular-value spectra of D's layers: ``python -m eval.analysis.spectra RUN_OR_CKPT [RUN_OR_CKPT ...]``.

For every weight layer of D (convs, linear, the projection embedding) the *effective* weight is the
one the layer computes with: ``W / sigma(W)`` under spectral normalization (with the stored power
iteration vectors, as in eval mode), ``g * V / ||V||`` under weight normalization, the raw ``W`` for
orthonormal regularization, clipping, GP or none. It is reshaped to ``(out, in * kh * kw)``, the
matrix the SN-GAN paper normalizes (Sec. 2.1), and its singular values are computed exactly
(float64 SVD), sorted and divided by the largest. Plotted per layer with one line per run, this is
the paper's comparison of the normalizations (Miyato et al. 2018, Sec. 3 and 4.2; the paper plots
the *squared* values, ``--squared``): weight normalization tends to leave few large singular values
(a low effective rank), orthonormal regularization pushes all of them towards one (a flat spectrum
that ignores the data's structure), spectral normalization constrains only the largest.

Also per run:

- ``lipschitz_bound``: prod_l sigma_max(W_l) over the layers on the path x -> D(x) (all but the
  class embedding). For a plain chain of layers with 1-Lipschitz activations (the standard CNN,
  DCGAN) this is the paper's upper bound on ||D||_Lip (Eq. 7), up to the reshaped-matrix
  approximation of a conv's operator norm; for a ResNet D, whose residual branches add, it is only
  the product, not a bound.
- ``operator_bound`` (``--operator-norm``): the same product with each conv's true operator norm, the
  norm of the linear map it computes at the run's resolution (power iteration with the adjoint), in
  place of the reshaped kernel's sigma. The two differ by up to about the kernel size per layer, which
  is how an SN discriminator can still output values far beyond what "1-Lipschitz" suggests.
- ``effective_rank`` per layer: exp of the Shannon entropy of ``s_i / sum s`` (Roy & Vetterli
  2007), between 1 (one direction) and min(out, in); and ``stable_rank`` ``sum s_i^2 / s_max^2``.

Writes ``OUT/spectra.json`` (all numbers) and ``OUT/spectra.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script path: the repository root on sys.path, not this folder (ARCHITECTURE.md)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(os.path.dirname(_HERE))] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch
from torch import nn

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)


def weight_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every conv / linear / embedding layer, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


@torch.no_grad()
def effective_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight the layer computes with, as a float64 ``(out, -1)`` matrix.

    ``layer.weight`` is already the normalized weight for SN and WN (both are parametrizations).
    """
    w = layer.weight.detach().double()
    if isinstance(layer, nn.ConvTranspose2d):  # weight is (in, out, kh, kw)
        w = w.movedim(1, 0)
    return w.reshape(w.shape[0], -1)


def spectrum_stats(singular_values: torch.Tensor) -> dict:
    """Normalized spectrum and ranks of a descending vector of singular values."""
    s = singular_values.double()
    top = float(s[0])
    if top <= 0:
        return {"sigma_max": 0.0, "normalized": [0.0] * len(s), "effective_rank": 0.0, "stable_rank": 0.0}
    p = s / s.sum()
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    return {"sigma_max": top, "normalized": (s / top).tolist(), "effective_rank": math.exp(entropy),
            "stable_rank": float((s * s).sum() / (top * top))}


def layer_spectra(model: nn.Module) -> List[dict]:
    out = []
    for name, layer in weight_layers(model):
        mat = effective_matrix(layer)
        s = torch.linalg.svdvals(mat)  # descending
        out.append({"name": name, "kind": type(layer).__name__, "matrix": list(mat.shape),
                    "in_lipschitz_path": not isinstance(layer, nn.Embedding), **spectrum_stats(s)})
    return out


def model_spectra(model: nn.Module) -> dict:
    """Per-layer spectra plus the Lipschitz bound (product of sigma_max) of ``model``."""
    layers = layer_spectra(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no conv, linear or embedding layers")
    path = [layer["sigma_max"] for layer in layers if layer["in_lipschitz_path"]]
    return {"layers": layers, "lipschitz_bound": math.prod(path),
            "mean_effective_rank": sum(layer["effective_rank"] for layer in layers) / len(layers),
            "mean_stable_rank": sum(layer["stable_rank"] for layer in layers) / len(layers)}


def conv_operator_norms(model: nn.Module, resolution: Optional[int] = None, num_classes: int = 0,
                        iters: int = 100, seed: int = 0) -> dict:
    """``{layer name: operator norm}`` of every 2-d conv of ``model`` as the linear map it computes on
    the input size it sees when ``model`` reads a ``resolution`` px image (default: the model's own
    ``resolution``, the size the config check uses) (stride, padding, dilation and groups as in
    forward, no bias), by power iteration with the adjoint from autograd.

    Spectral normalization divides by sigma of the reshaped ``(out, in*k*k)`` kernel; the conv's own
    operator norm can be up to about k times larger (Sedghi et al. 2019), so SN's per-layer bound of 1
    is not a bound on the map D computes. This measures the gap."""
    import torch.nn.functional as F
    resolution = resolution or model.resolution
    shapes = {}

    def record(name):
        def hook(mod, inp, out):  # returns None: the output is left as it is
            shapes.setdefault(name, tuple(inp[0].shape[1:]))
        return hook
    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    x = torch.zeros(1, 3, resolution, resolution, device=next(model.parameters()).device)
    y = torch.zeros(1, dtype=torch.long, device=x.device) if num_classes else None
    try:
        with torch.no_grad():
            model(x, y) if num_classes else model(x)
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or name not in shapes:
            continue
        w = m.weight.detach().double()
        conv = lambda v: F.conv2d(v, w, None, m.stride, m.padding, m.dilation, m.groups)  # noqa: E731
        v = torch.randn((1, *shapes[name]), generator=gen, dtype=torch.float64).to(w.device)
        v /= v.norm()
        sigma = 0.0
        for _ in range(iters):
            v = v.detach().requires_grad_(True)
            u = conv(v)
            sigma = float(u.detach().norm())
            (grad,) = torch.autograd.grad(u, v, grad_outputs=u / u.norm())
            v = grad / grad.norm()
        out[name] = sigma
    return out


def run_label(info: dict) -> str:
    return f"{info.get('exp') or 'run'} ({info.get('d_constraint')}, step {info.get('step')})"


def plot(results: Sequence[dict], path: str, cols: int = 4, title: Optional[str] = None,
         squared: bool = False) -> None:
    """One panel per layer (matched by name across runs), one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: List[str] = []
    for r in results:
        names += [layer["name"] for layer in r["layers"] if layer["name"] not in names]
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for i, name in enumerate(names):
        ax = axes.flat[i]
        for k, r in enumerate(results):
            layer = next((x for x in r["layers"] if x["name"] == name), None)
            if layer is not None:
                y = [v * v for v in layer["normalized"]] if squared else layer["normalized"]
                ax.plot(y, color=f"C{k}", lw=1.2, label=r["label"], marker="o" if len(y) <= 4 else None, ms=3)
        shape = next(x["matrix"] for r in results for x in r["layers"] if x["name"] == name)
        ax.set_title(f"{i + 1}: {name} {shape[0]}x{shape[1]}", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("(sigma_i / sigma_max)^2" if squared else "sigma_i / sigma_max", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(results)), fontsize=8, frameon=False)
    what = "Squared singular values" if squared else "Singular values"
    fig.suptitle(title or f"{what} of D's effective weights (sorted, relative to the largest)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if len(results) <= 3 else 0.1, 1, 0.96))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def analyse(paths: Sequence[str], labels: Optional[Sequence[str]] = None,
            operator_norm: bool = False) -> List[dict]:
    from eval.analysis.discriminator import load_discriminator
    results = []
    for i, path in enumerate(paths):
        D, info = load_discriminator(path)
        label = labels[i] if labels else run_label(info)
        res = {"label": label, "path": path, "ckpt": info["ckpt"], "step": info["step"],
               "exp": info["exp"], "d": info["d"], "d_constraint": info["d_constraint"], **model_spectra(D)}
        if operator_norm:
            with torch.enable_grad():
                norms = conv_operator_norms(D, num_classes=info.get("num_classes", 0))
            for layer in res["layers"]:
                if layer["name"] in norms:
                    layer["operator_norm"] = norms[layer["name"]]
            res["operator_bound"] = math.prod(
                layer.get("operator_norm", layer["sigma_max"]) for layer in res["layers"] if layer["in_lipschitz_path"])
        results.append(res)
    return results


def summary(results: Sequence[dict]) -> str:
    lines = ["| run | layers | Lipschitz bound (prod sigma_max) | mean effective rank | mean stable rank | "
             "effective rank per layer | stable rank per layer |", "|" + " --- |" * 7]
    for r in results:
        ranks = ", ".join(f"{x['effective_rank']:.1f}" for x in r["layers"])
        stable = ", ".join(f"{x['stable_rank']:.1f}" for x in r["layers"])
        lines.append(f"| {r['label']} | {len(r['layers'])} | {r['lipschitz_bound']:.4g} | "
                     f"{r['mean_effective_rank']:.2f} | {r['mean_stable_rank']:.2f} | {ranks} | {stable} |")
    ops = [r for r in results if "operator_bound" in r]
    if ops:
        lines += ["", "| run | bound from reshaped kernels (prod sigma_max) | bound from conv operator norms | "
                  "operator norm per layer |", "|" + " --- |" * 4]
        for r in ops:
            per = ", ".join(f"{x['operator_norm']:.2f}" for x in r["layers"] if "operator_norm" in x)
            lines.append(f"| {r['label']} | {r['lipschitz_bound']:.4g} | {r['operator_bound']:.4g} | {per} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_OR_CKPT",
                   help="run folders (newest checkpoint) or checkpoint folders ckpt-<step>/")
    p.add_argument("--out", default="spectra", help="output folder for spectra.png and spectra.json")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per path "
                                                  "(default: experiment, constraint and step)")
    p.add_argument("--cols", type=int, default=4, help="panels per row of the figure")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--squared", action="store_true", help="plot squared values, as the paper's figure")
    p.add_argument("--operator-norm", action="store_true",
                   help="also each conv's operator norm as the map it computes at the run's resolution (power "
                        "iteration) and their product: the bound SN's reshaped-kernel sigma does not give")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.paths):
        p.error(f"--labels has {len(labels)} entries for {len(args.paths)} paths")
    if args.cols < 1:
        p.error(f"--cols must be >= 1, got {args.cols}")
    from trainer.errors import exit_code_of, report
    try:
        results = analyse(args.paths, labels, args.operator_norm)
    except Exception as exc:
        if exit_code_of(exc) is None:
            raise  # a bug: its traceback, exit 1
        return report(exc)  # declared bad input: one line, exit 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "spectra.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    plot(results, os.path.join(args.out, "spectra.png"), args.cols, args.title, args.squared)
    print(summary(results))
    print(f"wrote {os.path.join(args.out, 'spectra.png')} and spectra.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
