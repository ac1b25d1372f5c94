"""Golden fixtures of the seeds' comparison: pytorch-gan-collections' own models, losses and training
step, recorded for our trainer to replay (tests/golden/harness.py, tests/test_golden.py -k seeds).

    . .venv/bin/activate
    python tests/golden/make_seeds.py --pgc /path/to/pytorch-gan-collections --out tests/golden/fixtures

The reference (PGC, w86763777/pytorch-gan-collections @ 860e90b) is imported from ``--pgc``, never
copied: its model modules ``source/models/{dcgan,wgangp,sngan}.py`` and ``source/losses.py``. Its
training loop lives in the scripts ``dcgan.py``, ``wgan.py``, ``wgangp.py``, ``sngan.py`` (absl flags,
tensorboard, a CIFAR-10 download), which cannot be imported; ``pgc_iteration`` below restates their
loop step by step with the line of each statement.

Width: PGC's constructors fix every width (e.g. ``nn.Conv2d(64, 128, ...)``), far too wide for a small
fixture (the files are 0.7 to 2 MB; in the SN-GAN ResNet rows the 100 real batches with their float32
dequantization noise are 1.2 MB of the 2). Each model is built by PGC's own constructor with the ``nn`` namespace of its module
replaced by one whose Conv2d / ConvTranspose2d / Linear / BatchNorm2d divide every channel count by
a factor (3 image channels, the output unit and z stay); at factor 1 the build is PGC's exactly (the
script checks it). ``ResGenerator32.forward`` reshapes with a literal 256 (``source/models/wgangp.py:154``,
``sngan.py:156``), so the narrowed G restates that one line with the narrowed width.

Every fixture is float64 throughout (models, inputs, Adam state), batch 4 (G step 8: PGC's G batch is
2x), K = 5 iterations at n_dis 5 and 10 at n_dis 1. ``total_steps`` is 2K (the LambdaLR decay is then
visible in K steps: 1 - step/2K); the fixture's overrides set ``train.steps`` to it.

``meta.zero_gradient`` lists the parameters whose gradient is zero in exact arithmetic (found from
PGC's own gradients: below 1e-9 of their layer weight's at every step): G's conv biases that feed a
BatchNorm and D's output bias under the Wasserstein loss. Their final values are rounding noise
amplified by Adam (lr * g / eps), to be compared on an absolute scale.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
import types
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

REFERENCE = "w86763777/pytorch-gan-collections@860e90b"
B = 4            # D batch; PGC's G step draws 2 * batch_size latents (dcgan.py:152 and the others)


@dataclass(frozen=True)
class Row:
    name: str            # fixture and experiment name
    config: str          # PGC config reproduced
    script: str          # PGC training script (its loop is restated in pgc_iteration)
    module: str          # PGC model module: source.models.<module>
    arch: str            # cnn32 | res32 (the script's --arch)
    loss: str            # PGC loss: bce | was | hinge
    n_dis: int
    z_dim: int
    betas: Tuple[float, float]
    g_factor: int        # PGC widths / this (our g_ch = PGC's G base width / g_factor)
    d_factor: int
    clip: float = 0.0    # wgan.py: c
    gp: float = 0.0      # wgangp.py: alpha (lambda)
    noise: bool = False  # sngan.py:93: + rand_like(x) / 128
    flip: bool = True    # dcgan/wgan/wgangp: RandomHorizontalFlip


ROWS = [
    Row("seeds_dcgan", "configs/DCGAN_CIFAR10.txt", "dcgan.py", "dcgan", "cnn32", "bce", 1, 100, (0.5, 0.9), 32, 16),
    Row("seeds_wgan", "configs/WGAN_CIFAR10_CNN.txt", "wgan.py", "wgangp", "cnn32", "was", 1, 100, (0.0, 0.9), 32, 16,
        clip=0.1),
    Row("seeds_wgangp_cnn", "configs/WGANGP_CIFAR10_CNN.txt", "wgangp.py", "wgangp", "cnn32", "was", 1, 100,
        (0.0, 0.9), 32, 16, gp=10.0),
    Row("seeds_wgangp_resnet", "configs/WGANGP_CIFAR10_RES.txt", "wgangp.py", "wgangp", "res32", "was", 5, 128,
        (0.0, 0.9), 16, 16, gp=10.0),
    Row("seeds_sngan_w_cnn", "configs/SNGAN_CIFAR10_CNN.txt (--loss=was)", "sngan.py", "sngan", "cnn32", "was", 1, 100,
        (0.0, 0.9), 32, 16, noise=True, flip=False),
    Row("seeds_sngan_hinge_resnet", "configs/SNGAN_CIFAR10_RES.txt", "sngan.py", "sngan", "res32", "hinge", 5, 128,
        (0.0, 0.9), 16, 16, noise=True, flip=False),
    Row("seeds_sngan_w_resnet", "configs/SNGAN_CIFAR10_RES.txt (--loss=was)", "sngan.py", "sngan", "res32", "was", 5,
        128, (0.0, 0.9), 16, 16, noise=True, flip=False),
]

# PGC's base widths (the channel count our ``ch`` stands for): G / D.
PGC_WIDTH = {("dcgan", "cnn32"): (128, 64), ("wgangp", "cnn32"): (64, 64), ("sngan", "cnn32"): (64, 64),
             ("wgangp", "res32"): (256, 128), ("sngan", "res32"): (256, 128)}


# ----------------------------------------------------------------------------- PGC, imported
def import_pgc(path: str):
    if not os.path.isfile(os.path.join(path, "source", "losses.py")):
        print(f"error: --pgc {path}: no source/losses.py there; pass a clone of "
              f"github.com/w86763777/pytorch-gan-collections (860e90b)", file=sys.stderr)
        raise SystemExit(2)
    sys.path.insert(0, os.path.abspath(path))
    mods = {name: importlib.import_module(f"source.models.{name}") for name in ("dcgan", "wgangp", "sngan")}
    return mods, importlib.import_module("source.losses")


def narrow_nn(factor: int, keep: Tuple[int, ...]):
    """A stand-in for ``torch.nn`` whose layer constructors divide channel counts by ``factor``."""
    def w(v: int) -> int:
        if v in keep or factor == 1:
            return v
        if v % factor:
            raise ValueError(f"width {v} is not divisible by {factor}")
        return v // factor

    class Conv2d(nn.Conv2d):
        def __init__(self, i, o, *a, **k):
            super().__init__(w(i), w(o), *a, **k)

    class ConvTranspose2d(nn.ConvTranspose2d):
        def __init__(self, i, o, *a, **k):
            super().__init__(w(i), w(o), *a, **k)

    class Linear(nn.Linear):
        def __init__(self, i, o, *a, **k):
            super().__init__(w(i), w(o), *a, **k)

    class BatchNorm2d(nn.BatchNorm2d):
        def __init__(self, n, *a, **k):
            super().__init__(w(n), *a, **k)

    ns = types.ModuleType("narrow_nn")
    ns.__dict__.update({k: getattr(nn, k) for k in dir(nn) if not k.startswith("__")})
    ns.Conv2d, ns.ConvTranspose2d, ns.Linear, ns.BatchNorm2d = Conv2d, ConvTranspose2d, Linear, BatchNorm2d
    return ns


def build_pgc(module, row: Row, which: str, factor: int) -> nn.Module:
    """PGC's own constructor (dcgan.py:106-107: ``net_G_models[arch](z_dim)``, ``net_D_models[arch]()``),
    its ``nn`` narrowed by ``factor``."""
    cls = {("cnn32", "G"): "Generator32", ("cnn32", "D"): "Discriminator32",
           ("res32", "G"): "ResGenerator32", ("res32", "D"): "ResDiscriminator32"}[(row.arch, which)]
    cls = getattr(module, cls)
    # z is a width that stays; D has no z (its 128 channels must narrow even when z is 128).
    keep = (1, 3, row.z_dim) if which == "G" else (1, 3)
    saved = module.nn
    module.nn = narrow_nn(factor, keep)
    try:
        if which == "G" and row.arch == "res32" and factor > 1:
            width = 256 // factor

            class NarrowResGenerator32(cls):
                def forward(self, z):
                    # source/models/wgangp.py:152-155 / sngan.py:154-157, its literal 256 replaced by the narrowed width
                    z = self.linear(z)
                    z = z.view(-1, width, 4, 4)
                    return self.output(self.blocks(z))
            return NarrowResGenerator32(row.z_dim)
        return cls(row.z_dim) if which == "G" else cls()
    finally:
        module.nn = saved


def check_narrowing_is_transparent(module, row: Row) -> None:
    """At factor 1 the stand-in ``nn`` builds PGC's model exactly (same tensors from the same seed)."""
    for which in ("G", "D"):
        cls = {("cnn32", "G"): "Generator32", ("cnn32", "D"): "Discriminator32",
               ("res32", "G"): "ResGenerator32", ("res32", "D"): "ResDiscriminator32"}[(row.arch, which)]
        torch.manual_seed(0)
        a = build_pgc(module, row, which, 1).state_dict()
        torch.manual_seed(0)
        b = (getattr(module, cls)(row.z_dim) if which == "G" else getattr(module, cls)()).state_dict()
        assert list(a) == list(b), (row.name, which)
        for k in a:
            assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (row.name, which, k)


# ----------------------------------------------------------------------------- inputs
def real_batches(row: Row, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` batches of B real images as PGC's transform leaves them, in float32 as there, then
    float64 for the float64 model: RandomHorizontalFlip (dcgan.py:88, wgan.py:91, wgangp.py:108; not
    in sngan.py), ToTensor (x / 255), Normalize(0.5, 0.5) ((x - 0.5) / 0.5), and in sngan.py:93
    ``x + torch.rand_like(x) / 128``. The images are our synthetic shapes (data_pipelines.synthetic)."""
    from data_pipelines.synthetic import render
    images, _ = render(range(count * B), resolution=32, seed=0)
    out = []
    for img in images:
        x = img
        if row.flip and torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        x = x.to(torch.float32).div(255)
        x = (x - 0.5) / 0.5
        if row.noise:
            x = x + torch.rand(x.shape, generator=gen, dtype=torch.float32) / 128
        out.append(x)
    return torch.stack(out).to(torch.float64).view(count, B, 3, 32, 32)


# ----------------------------------------------------------------------------- the loop
def track_grads(net: nn.Module, who: str, rec) -> None:
    """Largest |gradient| seen per parameter (not part of PGC's loop: finds the round-off-only ones)."""
    for name, p in net.named_parameters():
        if p.grad is not None:
            key = f"{who}/{name}"
            rec["gmax"][key] = max(rec["gmax"].get(key, 0.0), float(p.grad.abs().max()))


def zero_gradient_keys(mapping: Dict[str, str], who: str, gmax: Dict[str, float]) -> List[str]:
    """Our keys of biases whose gradient is zero in exact arithmetic (a bias feeding a BatchNorm):
    every gradient PGC computed for it is below 1e-9 of its layer weight's. Their final values are
    round-off of Adam's m / (sqrt(v) + eps) on that noise, not a trajectory."""
    out = []
    for ours, ref in mapping.items():
        if not ref.endswith("bias"):
            continue
        wkey = ref[:-len("bias")] + ("weight_orig" if f"{who}/{ref[:-4]}weight_orig" in gmax else "weight")
        g, gw = gmax.get(f"{who}/{ref}", 0.0), gmax.get(f"{who}/{wkey}", 0.0)
        if gw > 0 and g < 1e-9 * gw:
            out.append(f"{who}/{ours}")
    return out


def pgc_iteration(row: Row, net_G, net_D, loss_fn, optim_G, optim_D, sched_G, sched_D, inputs, k: int, rec) -> None:
    """One step of PGC's training loop (the body of ``for step in pbar``), in its order.

    Line numbers: dcgan.py / wgan.py / wgangp.py / sngan.py.
    """
    for j in range(row.n_dis):                                     # 133 / 136 / 153 / 136
        with torch.no_grad():                                      # 134 / 137 / 154 / 137
            z = inputs["in/d_z"][k, j]                             # 135 / 138 / 155 / 138 torch.randn(batch, z_dim)
            fake = net_G(z).detach()                               # 136 / 139 / 156 / 139
        real = inputs["in/d_x"][k, j]                              # 137 / 140 / 157 / 140 next(looper)
        net_D_real = net_D(real)                                   # 138 / 141 / 158 / 141
        net_D_fake = net_D(fake)                                   # 139 / 142 / 159 / 142
        loss = loss_fn(net_D_real, net_D_fake)                     # 140 / 143 / 160 / 143
        if row.gp:
            # wgangp.py:161-162 and cacl_gradient_penalty (wgangp.py:86-100); t is the recorded draw of
            # its torch.rand(real.size(0), 1, 1, 1)
            t = inputs["in/d_alpha"][k, j].view(-1, 1, 1, 1).expand(real.size())
            interpolates = t * real + (1 - t) * fake
            interpolates.requires_grad_(True)
            disc_interpolates = net_D(interpolates)
            grad = torch.autograd.grad(outputs=disc_interpolates, inputs=interpolates,
                                       grad_outputs=torch.ones_like(disc_interpolates),
                                       create_graph=True, retain_graph=True)[0]
            grad_norm = torch.norm(torch.flatten(grad, start_dim=1), dim=1)
            loss_gp = torch.mean((grad_norm - 1) ** 2)
            loss = loss + row.gp * loss_gp                         # wgangp.py:162 loss_all
        optim_D.zero_grad()                                        # 142 / 145 / 164 / 145
        loss.backward()                                            # 143 / 146 / 165 / 146
        track_grads(net_D, "D", rec)
        optim_D.step()                                             # 144 / 147 / 166 / 147
        if row.clip:
            for p in net_D.parameters():                           # wgan.py:149-150
                p.data.clamp_(-row.clip, row.clip)
        rec["loss/d"][k, j] = float(loss.detach())                 # before the display negation (dcgan.py:146-147)
    if row.gp:
        for p in net_D.parameters():                               # wgangp.py:175-177
            p.requires_grad_(False)
    z = inputs["in/g_z"][k]                                        # 152 / 158 / 178 / 155 torch.randn(2 * batch, z_dim)
    loss = loss_fn(net_D(net_G(z)))                                # 153 / 159 / 179 / 156
    optim_G.zero_grad()                                            # 155 / 161 / 181 / 158
    loss.backward()                                                # 156 / 162 / 182 / 159
    track_grads(net_G, "G", rec)
    optim_G.step()                                                 # 157 / 163 / 183 / 160
    if row.gp:
        for p in net_D.parameters():                               # wgangp.py:184-185
            p.requires_grad_(True)
    sched_G.step()                                                 # 159 / 165 / 187 / 162
    sched_D.step()                                                 # 160 / 166 / 188 / 163
    rec["loss/g"][k] = float(loss.detach())


# ----------------------------------------------------------------------------- role mapping
_ROLE_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d, nn.Embedding)


def call_order(model: nn.Module, x: torch.Tensor) -> List[Tuple[str, nn.Module]]:
    """The weight layers of ``model`` in the order its forward calls them (on a copy, eval mode)."""
    model = copy.deepcopy(model).eval()
    names = {id(m): n for n, m in model.named_modules()}
    order, hooks = [], []
    for m in model.modules():
        if isinstance(m, _ROLE_TYPES):
            hooks.append(m.register_forward_pre_hook(lambda mod, _inp: order.append(mod)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    seen, out = set(), []
    for m in order:
        if id(m) not in seen:
            seen.add(id(m))
            out.append((names[id(m)], m))
    return out


def _local_tensors(prefix: str, m: nn.Module, ours: bool) -> Dict[str, str]:
    """role-local name -> full state_dict key (weight, bias, u, v, running_mean, running_var)."""
    p = f"{prefix}." if prefix else ""
    out = {}
    if ours and hasattr(m, "parametrizations") and "weight" in m.parametrizations:
        out["weight"] = f"{p}parametrizations.weight.original"
        sn = m.parametrizations.weight[0]
        if hasattr(sn, "_u"):
            out["u"], out["v"] = f"{p}parametrizations.weight.0._u", f"{p}parametrizations.weight.0._v"
    elif not ours and hasattr(m, "weight_orig"):
        out.update(weight=f"{p}weight_orig", u=f"{p}weight_u", v=f"{p}weight_v")
    else:
        out["weight"] = f"{p}weight"
    if getattr(m, "bias", None) is not None:
        out["bias"] = f"{p}bias"
    if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
        out["running_mean"], out["running_var"] = f"{p}running_mean", f"{p}running_var"
    return out


def role_map(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> Dict[str, str]:
    """{our state_dict key: PGC's} matched by role: the i-th weight layer each forward calls, same
    type family and shapes."""
    a, b = call_order(ours, x), call_order(ref, x)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} weight layers in ours vs {len(b)} in PGC's:\n"
                         f"{[n for n, _ in a]}\n{[n for n, _ in b]}")
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    mapping = {}
    for (na, ma), (nb, mb) in zip(a, b):
        fam = next(t for t in _ROLE_TYPES if isinstance(mb, t))
        if not isinstance(ma, fam):
            raise ValueError(f"role mismatch: ours {na} ({type(ma).__name__}) vs PGC {nb} ({type(mb).__name__})")
        la, lb = _local_tensors(na, ma, True), _local_tensors(nb, mb, False)
        if set(la) != set(lb):
            raise ValueError(f"{na} vs {nb}: tensors {sorted(la)} vs {sorted(lb)}")
        for role in la:
            if ours_sd[la[role]].shape != ref_sd[lb[role]].shape:
                raise ValueError(f"{la[role]} {tuple(ours_sd[la[role]].shape)} vs {lb[role]} "
                                 f"{tuple(ref_sd[lb[role]].shape)}")
            mapping[la[role]] = lb[role]
    params = {n for n, _ in ours.named_parameters()}
    missing = params - set(mapping)
    if missing:
        raise ValueError(f"our parameters without a PGC counterpart: {sorted(missing)}")
    return mapping


# ----------------------------------------------------------------------------- one row
def our_models(row: Row, overrides: List[str]):
    """Our G and D as the trainer builds them for the fixture (structure only; values come from PGC)."""
    from trainer.build import build_parts
    from trainer.config import load_config
    cfg = load_config(row.name, overrides + ["train.precision=fp32"])
    parts = build_parts(cfg, torch.device("cpu"))
    return parts.G.double(), parts.D.double()


def make_row(row: Row, pgc_models, pgc_losses, out_dir: str, seed: int = 0) -> str:
    module = pgc_models[row.module]
    check_narrowing_is_transparent(module, row)
    K = 5 if row.n_dis == 5 else 10
    total_steps = 2 * K
    gw, dw = PGC_WIDTH[(row.module, row.arch)]
    g_ch, d_ch = gw // row.g_factor, dw // row.d_factor
    overrides = [f"model.g_ch={g_ch}", f"model.d_ch={d_ch}", f"model.z_dim={row.z_dim}",
                 f"train.batch_size={B}", f"train.g_batch_size={2 * B}", f"train.steps={total_steps}"]

    torch.manual_seed(seed)
    net_G = build_pgc(module, row, "G", row.g_factor).double()   # dcgan.py:106 (.to(device))
    net_D = build_pgc(module, row, "D", row.d_factor).double()   # dcgan.py:107
    loss_fn = {"bce": pgc_losses.BCEWithLogits, "hinge": pgc_losses.Hinge,
               "was": pgc_losses.Wasserstein}[row.loss]()       # dcgan.py:25-30,108
    # dcgan.py:110-115 (the same lines in the other scripts): torch Adam, LambdaLR 1 - step / total_steps
    lr = 2e-4
    optim_G = torch.optim.Adam(net_G.parameters(), lr=lr, betas=row.betas)
    optim_D = torch.optim.Adam(net_D.parameters(), lr=lr, betas=row.betas)
    sched_G = torch.optim.lr_scheduler.LambdaLR(optim_G, lambda step: 1 - step / total_steps)
    sched_D = torch.optim.lr_scheduler.LambdaLR(optim_D, lambda step: 1 - step / total_steps)

    G, D = our_models(row, overrides)
    zg = torch.zeros(2, row.z_dim, dtype=torch.float64)
    g_map = role_map(G, net_G, zg)
    d_map = role_map(D, net_D, torch.zeros(2, 3, 32, 32, dtype=torch.float64))

    gen = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "in/g_z": torch.randn(K, 2 * B, row.z_dim, generator=gen, dtype=torch.float64),
        "in/d_x": real_batches(row, K * row.n_dis, gen).view(K, row.n_dis, B, 3, 32, 32),
        "in/d_z": torch.randn(K, row.n_dis, B, row.z_dim, generator=gen, dtype=torch.float64),
    }
    if row.gp:
        inputs["in/d_alpha"] = torch.rand(K, row.n_dis, B, generator=gen, dtype=torch.float64)

    def snapshot(prefix: str) -> Dict[str, np.ndarray]:
        out = {}
        for who, mapping, ref in (("G", g_map, net_G), ("D", d_map, net_D)):
            sd = ref.state_dict()
            for ours_key, ref_key in mapping.items():
                out[f"{prefix}{who}/{ours_key}"] = sd[ref_key].detach().to(torch.float64).numpy().copy()
        return out

    arrays = snapshot("")
    rec = {"loss/d": np.zeros((K, row.n_dis)), "loss/g": np.zeros(K), "gmax": {}}
    net_G.train()
    net_D.train()
    for k in range(K):
        pgc_iteration(row, net_G, net_D, loss_fn, optim_G, optim_D, sched_G, sched_D, inputs, k, rec)
    arrays.update(snapshot("final/"))
    arrays.update({k: v.numpy() for k, v in inputs.items()})
    arrays.update({k: v for k, v in rec.items() if k.startswith("loss/")})
    zero_grad = zero_gradient_keys(g_map, "G", rec["gmax"]) + zero_gradient_keys(d_map, "D", rec["gmax"])

    order = "d_first"
    meta = {"name": row.name, "reference": REFERENCE, "reference_config": row.config,
            "reference_script": row.script, "experiment": row.name, "overrides": overrides,
            "iterations": K, "n_dis": row.n_dis, "order": order, "dtype": "float64",
            "param_map": {**{f"G/{k}": v for k, v in g_map.items()}, **{f"D/{k}": v for k, v in d_map.items()}},
            "width_factor": {"G": row.g_factor, "D": row.d_factor},
            # biases whose exact gradient is 0 (they feed a BatchNorm): their final values are round-off
            "zero_gradient": zero_grad,
            "zero_gradient_note": "parameters whose gradient is zero in exact arithmetic (a bias followed only by "
                                  "a batch-statistics BatchNorm, or D's output bias under the Wasserstein loss); "
                                  "their final values are the reference's rounding noise amplified by Adam "
                                  "(lr * g / eps): compare them on an absolute scale",
            "command": "python tests/golden/make_seeds.py --pgc PATH --out tests/golden/fixtures"}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{row.name}.npz")
    # Inputs PGC fed as float32 values (its real images) are stored as float32: the same numbers.
    arrays = {k: (v.astype(np.float32) if k.startswith("in/") and v.dtype == np.float64
                  and np.array_equal(v.astype(np.float32).astype(np.float64), v) else v) for k, v in arrays.items()}
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
    print(f"{row.name}: K={K} n_dis={row.n_dis} G ch {g_ch} D ch {d_ch} -> {path} "
          f"({os.path.getsize(path) / 1e6:.2f} MB); losses d[-1]={rec['loss/d'][-1, -1]:.6g} "
          f"g[-1]={rec['loss/g'][-1]:.6g}")
    for who, mapping in (("G", g_map), ("D", d_map)):
        for ours_key, ref_key in mapping.items():
            note = "   (exact gradient 0: round-off only)" if f"{who}/{ours_key}" in zero_grad else ""
            print(f"    {who}/{ours_key:48s} <- {ref_key}{note}")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pgc", required=True, help="a pytorch-gan-collections clone (860e90b)")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "golden", "fixtures"))
    p.add_argument("--rows", default="", help="comma-separated row names (default: all seven)")
    p.add_argument("--diagnose-sn-eps", action="store_true",
                   help="diagnostic, never commit its output: run torch.nn.utils.spectral_norm with the official "
                        "x / (||x|| + eps) instead of its x / max(||x||, eps), to show that this placement is the "
                        "whole difference left between PGC and our replay")
    args = p.parse_args(argv)
    if args.diagnose_sn_eps:
        import torch.nn.functional as F
        torch_normalize = F.normalize

        def normalize(x, p=2.0, dim=1, eps=1e-12, out=None):
            if p != 2.0:
                return torch_normalize(x, p, dim, eps, out)
            r = x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)
            return r if out is None else out.copy_(r)
        F.normalize = normalize   # torch.nn.utils.spectral_norm calls F.normalize(..., dim=0, eps=, out=)
    rows = ROWS
    if args.rows:
        known = {r.name: r for r in ROWS}
        bad = [n for n in args.rows.split(",") if n not in known]
        if bad:
            print(f"error: --rows {bad} unknown; valid: {', '.join(known)}", file=sys.stderr)
            return 2
        rows = [known[n] for n in args.rows.split(",")]
    torch.set_num_threads(1)
    pgc_models, pgc_losses = import_pgc(args.pgc)
    for row in rows:
        make_row(row, pgc_models, pgc_losses, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
