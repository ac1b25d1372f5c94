"""Replays a reference implementation's recorded training run through our real training loop.

A fixture (``tests/golden/fixtures/<name>.npz``, format in tests/golden/README.md) holds the
reference code's initial weights and SN vectors, every input it consumed (real batches after its
pixel transform, latents, fake labels, gradient-penalty weights), its losses at every D and G step and
its parameters after K iterations. ``replay`` builds OUR trainer from the fixture's experiment and
overrides (``trainer.build.build_parts``: our models, optimizers, losses, constraints), loads the
initial tensors, and runs ``trainer.loop.Loop._iteration`` K times; only the sources of the inputs
are replaced (``ReplayLoop``), never the computation. ``compare`` gives the largest relative
differences of losses and final tensors.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from trainer.build import build_parts
from trainer.config import load_config, validate
from trainer.loop import Loop

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOLERANCE = 1e-9      # relative, float64: losses and every final tensor
# A tensor whose reference AND our final values both stay below this in magnitude had no gradient
# signal: a conv bias right before a BatchNorm (G's residual blocks), which BN cancels, so its exact
# gradient is zero and what Adam does with rounding-level gradients (~1e-17, divided by
# sqrt(v) + eps) is noise of ~1e-11. Such tensors are checked to stay noise on both sides (and
# counted), not compared relatively; nothing the model computes depends on them.
NOISE = 1e-8
# G's BatchNorm running statistics do not enter training (train-mode BN uses batch statistics), and a
# running mean averages the batch means of a layer whose input carries those gradient-free biases'
# noise: ~1e-11 absolute, up to ~1e-9 relative on a small mean. They are compared at this tolerance.
STATS_TOLERANCE = 1e-7
STATS = ("running_mean", "running_var")


@dataclass
class Fixture:
    name: str
    meta: dict
    arrays: Dict[str, np.ndarray]

    def tensors(self, prefix: str) -> Dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}


def fixture_paths() -> List[str]:
    if not os.path.isdir(FIXTURES):
        return []
    return sorted(os.path.join(FIXTURES, f) for f in os.listdir(FIXTURES) if f.endswith(".npz"))


def load_fixture(path: str) -> Fixture:
    with np.load(path, allow_pickle=False) as data:   # data, never code
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    return Fixture(meta.get("name", os.path.basename(path)[:-4]), meta, arrays)


class ReplayLoop(Loop):
    """Our loop with the fixture's inputs in place of the data stream and the noise generator."""

    def __init__(self, *args, fixture: Fixture, dtype: torch.dtype, **kwargs):
        super().__init__(*args, **kwargs)
        self.fx, self.dtype = fixture, dtype
        self.d_count = 0                     # D steps taken (k * n_dis + j)
        self.g_count = 0
        self.losses: Dict[str, List[float]] = {"d": [], "g": []}

    def _t(self, key: str, index) -> torch.Tensor:
        a = torch.from_numpy(np.ascontiguousarray(self.fx.arrays[key][index]))
        return a.to(self.dtype) if a.is_floating_point() else a.long()

    def _opt(self, key: str, index) -> Optional[torch.Tensor]:
        return self._t(key, index) if key in self.fx.arrays else None

    def _d_index(self):
        n_dis = self.cfg.train.n_dis
        return divmod(self.d_count, n_dis)

    def _d_inputs(self):
        idx = self._d_index()
        return (self._t("in/d_x", idx), self._opt("in/d_y", idx),
                self._t("in/d_z", idx), self._opt("in/d_yf", idx))

    def _g_inputs(self):
        k = self.g_count
        return self._t("in/g_z", k), self._opt("in/g_y", k)

    def _gp_alpha(self, n: int) -> torch.Tensor:
        return self._t("in/d_alpha", self._d_index())

    def _d_loss(self):
        loss = super()._d_loss()
        self.losses["d"].append(float(loss.detach()))
        self.d_count += 1
        return loss

    def _g_loss(self):
        loss = super()._g_loss()
        self.losses["g"].append(float(loss.detach()))
        self.g_count += 1
        return loss


@dataclass
class Result:
    loss_d: np.ndarray
    loss_g: np.ndarray
    state: Dict[str, np.ndarray] = field(default_factory=dict)   # "G/<key>", "D/<key>"


def _load_initial(module: torch.nn.Module, tensors: Dict[str, np.ndarray], who: str) -> None:
    state = module.state_dict()
    params = {name for name, _ in module.named_parameters()}
    missing = sorted(params - set(tensors))
    if missing:
        raise KeyError(f"{who}: the fixture has no initial value for parameters {missing[:8]}")
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise KeyError(f"{who}: the fixture names tensors our model does not have: {unknown[:8]}")
    with torch.no_grad():
        for key, value in tensors.items():
            ours = state[key]
            if tuple(ours.shape) != tuple(value.shape):
                raise ValueError(f"{who}/{key}: fixture shape {value.shape} vs ours {tuple(ours.shape)}")
            ours.copy_(torch.from_numpy(value))


def build_config(fx: Fixture, extra: Sequence[str] = ()):
    m = fx.meta
    cfg = load_config(m["experiment"], [*m.get("overrides", []), "train.precision=fp32", "train.compile=false",
                                        "train.channels_last=false", "train.ema_half_life_kimg=0",
                                        "optim.implementation=loop", *extra])
    validate(cfg)
    if cfg.train.n_dis != m["n_dis"]:
        raise ValueError(f"{fx.name}: experiment n_dis {cfg.train.n_dis} vs fixture {m['n_dis']}")
    return cfg


def replay(fx: Fixture, extra: Sequence[str] = (), dtype: torch.dtype = torch.float64,
           iterations: Optional[int] = None) -> Result:
    """Our trainer on the fixture's inputs; ``extra`` overrides (e.g. ``model.sn_iteration=uv``)."""
    cfg = build_config(fx, extra)
    device = torch.device("cpu")
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        parts = build_parts(cfg, device)
        _load_initial(parts.G, fx.tensors("G/"), "G")
        _load_initial(parts.D, fx.tensors("D/"), "D")
        if cfg.model.sn_warmup:   # our optional warm-up refines the reference's initial u
            from models import configure_spectral_norm
            configure_spectral_norm(parts.D, cfg.model.sn_iteration, cfg.model.sn_warmup)
        parts.G.to(dtype)
        parts.D.to(dtype)
        with tempfile.TemporaryDirectory() as run_dir:
            loop = ReplayLoop(cfg, parts, parts.G, parts.D, device, run_dir, fixture=fx, dtype=dtype)
            for _ in range(iterations or fx.meta["iterations"]):
                loop._iteration()
        state = {f"G/{k}": v.detach().double().numpy() for k, v in parts.G.state_dict().items()}
        state.update({f"D/{k}": v.detach().double().numpy() for k, v in parts.D.state_dict().items()})
        k = fx.meta["iterations"]
        return Result(np.asarray(loop.losses["d"]).reshape(k, cfg.train.n_dis), np.asarray(loop.losses["g"]), state)
    finally:
        torch.set_default_dtype(before)


@dataclass
class Diff:
    loss: float            # max |ours - ref| / max(1, |ref|) over every D and G step
    loss_at: str
    tensor: float          # max over final tensors of ||ours - ref||_inf / ||ref||_inf
    tensor_at: str
    tensors: int
    noise: List[str] = field(default_factory=list)   # gradient-free tensors (both sides below NOISE)
    stats: float = 0.0     # the same measure over G's BatchNorm running statistics
    stats_at: str = ""

    def __str__(self) -> str:
        return (f"losses {self.loss:.2e} (worst {self.loss_at}), final parameters and SN u {self.tensor:.2e} "
                f"(worst {self.tensor_at}, {self.tensors} compared, {len(self.noise)} gradient-free), "
                f"BN running stats {self.stats:.2e} (worst {self.stats_at})")

    def within(self) -> bool:
        return self.loss <= TOLERANCE and self.tensor <= TOLERANCE and self.stats <= STATS_TOLERANCE


def compare(fx: Fixture, res: Result, gradient_free: Sequence[str] = ()) -> Diff:
    """``gradient_free``: tensors to count as such whatever their values (a float32 replay's noise is
    above ``NOISE``: pass the float64 replay's ``Diff.noise``)."""
    ref_d, ref_g = fx.arrays["loss/d"], fx.arrays["loss/g"]
    if res.loss_d.shape != ref_d.shape or res.loss_g.shape != ref_g.shape:
        raise ValueError(f"{fx.name}: ours took {res.loss_d.shape} D / {res.loss_g.shape} G steps, "
                         f"the reference {ref_d.shape} / {ref_g.shape}")
    worst, at = 0.0, ""
    for name, ours, ref in (("D", res.loss_d, ref_d), ("G", res.loss_g, ref_g)):
        rel = np.abs(ours - ref) / np.maximum(1.0, np.abs(ref))
        i = np.unravel_index(int(np.argmax(rel)), rel.shape)
        if rel[i] >= worst:
            worst, at = float(rel[i]), f"{name} step {tuple(int(j) for j in i)}: ours {ours[i]!r} ref {ref[i]!r}"
    t_worst, t_at, count, noise = 0.0, "", 0, []
    s_worst, s_at = 0.0, ""
    for key, ref in fx.tensors("final/").items():
        if key not in res.state:
            raise KeyError(f"{fx.name}: final tensor {key} has no counterpart in our model")
        ours = res.state[key]
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        if key in gradient_free or (scale < NOISE and (float(np.max(np.abs(ours))) if ours.size else 0.0) < NOISE):
            noise.append(key)
            continue
        scale = max(scale, 1e-300)
        rel = float(np.max(np.abs(ours - ref))) / scale
        if key.rsplit(".", 1)[-1] in STATS:
            if rel >= s_worst:
                s_worst, s_at = rel, key
            continue
        count += 1
        if rel >= t_worst:
            t_worst, t_at = rel, key
    return Diff(worst, at, t_worst, t_at, count, noise, s_worst, s_at)
