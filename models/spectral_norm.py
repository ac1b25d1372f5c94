"""Spectral normalization (Miyato et al., ICLR 2018, Sec. 2.1 and Appendix A): the one implementation.

A weight W is used as W_SN = W / sigma(W), where sigma(W) is the largest singular value of W
reshaped to a (out, -1) matrix, estimated by power iteration with persistent vectors u, v.

Design choices:
- It is a ``torch.nn.utils.parametrize`` parametrization, so ``module.weight`` *is* the normalized
  weight and the raw weight lives in ``module.parametrizations.weight.original``.
- The official computation by default (``iteration="official"``): per forward, from the stored u,
  v = W^T u / (||W^T u|| + eps), u = W v / (||W v|| + eps), sigma = u^T W v, as
  ``source/functions/max_sv.py`` of the official Chainer code (sngan_projection, chainer-gan-lib) and,
  up to eps placement, ``torch.nn.utils.spectral_norm`` (``iteration="torch"``: x / max(||x||, eps),
  which moves each normalization by ~1e-11 relative). u starts as a random N(0, 1) vector with no
  warm-up, as there. ``iteration="uv"`` is the order of torch's newer
  ``parametrizations.spectral_norm`` (u from the stored v, then v, sigma = ||W^T u||); with the same
  start it gives another sigma, and the two estimators drift apart as W moves (tests/test_golden.py
  measures what that does to a training trajectory). ``warmup_iterations`` > 0 refines u at
  construction (sigma accurate from the first step; not the official behaviour).
- fp32 at least: the power iteration and sigma run in float32 with autocast disabled, whatever the
  layer's dtype or the surrounding autocast region (float64 weights stay float64: nothing is cast
  down); only the final W_SN is cast back to the weight's own dtype (autocast then casts it to the
  compute dtype inside the conv/linear). PyTorch's own ``parametrizations.spectral_norm`` runs
  ``mv`` under autocast, i.e. in fp16/bf16.
- Gradient: sigma = u^T W v with u, v treated as constants, which is the paper's gradient
  (d sigma / dW = u v^T, Eq. 10-12); once u, v have converged this equals the gradient of the exact
  spectral norm. The backward of W / sigma is written out in closed form (``_DivideBySigma``):
  three weight-sized passes instead of autograd's eight or so, which is most of what SN costs in a
  D step; it is itself differentiable (gradient penalties on an SN D).
- DDP safety: u and v are updated in place *before* being used, and the graph only sees fresh
  copies of them. A second forward (real then fake before one backward), or DDP's buffer
  broadcast (``broadcast_buffers=True`` copies rank 0's buffers in place at every forward), therefore
  never modifies a tensor saved for backward. Under ``torch.compile`` the iteration is one custom
  op returning fresh copies, so the compiler cannot save (or recompute from) the buffers instead.
- Identical u across ranks: u and v are buffers. DDP broadcasts rank 0's buffers at construction and,
  with ``broadcast_buffers=True``, before every forward; besides, every rank holds the same W (grads
  are all-reduced) and the power iteration is deterministic, so the ranks' u would agree anyway.
- Training mode updates u, v (``n_power_iterations`` steps per forward); eval mode reuses the stored
  u, v, so outputs are deterministic and u is left unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["SpectralNorm", "spectral_norm", "remove_spectral_norm", "spectral_norm_layers", "sigmas",
           "configure_spectral_norm", "ITERATIONS"]

ITERATIONS = ("official", "torch", "uv")


def _default_dim(module: nn.Module) -> int:
    # ConvTranspose weights are (in, out, kH, kW): the output dimension is 1.
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return 1
    return 0


def _fp32_region(device_type: str):
    """Autocast off where it is on (entering an autocast context costs microseconds per layer;
    ``meta`` has no autocast at all)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for a float64 tensor: the power iteration never runs below fp32 and never
    casts a float64 model down."""
    return t if t.dtype == torch.float64 else t.float()


def _power_iteration(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n: int, eps: float,
                     order: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n >= 1`` power-iteration steps on the matrix ``w`` (no graph: ``w`` is detached).

    The buffers u, v are updated in place; the returned u, v are *fresh* tensors with the same
    values (what the autograd graph may keep), and sigma = u^T W v for the returned pair.

    ``order`` is the index in ``ITERATIONS``. 0, official: v = W^T u / (||W^T u|| + eps),
    u = W v / (||W v|| + eps), sigma = u . (W v) (Algorithm 1 of the paper, as the official
    ``max_sv.py``). 1, torch: the same with x / max(||x||, eps) (``torch.nn.utils.spectral_norm``).
    2, uv: torch's parametrization order: u = W v / max(||W v||, eps) from the stored v, then
    v = W^T u / max(||W^T u||, eps), sigma = ||W^T u|| (equal to u^T W v for that pair).
    """
    u_new, v_new = u, v
    for _ in range(n):
        if order < 2:
            wtu = torch.mv(w.t(), u_new)
            norm = torch.linalg.vector_norm(wtu)
            v_new = wtu / (norm + eps if order == 0 else norm.clamp_min(eps))
            wv = torch.mv(w, v_new)
            norm = torch.linalg.vector_norm(wv)
            u_new = wv / (norm + eps if order == 0 else norm.clamp_min(eps))
            sigma = torch.dot(u_new, wv)
        else:
            wv = torch.mv(w, v_new)
            u_new = wv / torch.linalg.vector_norm(wv).clamp_min(eps)
            wtu = torch.mv(w.t(), u_new)
            sigma = torch.linalg.vector_norm(wtu)
            v_new = wtu / sigma.clamp_min(eps)
    u.copy_(u_new)
    v.copy_(v_new)
    return u_new, v_new, sigma


@torch.library.custom_op("sngan::sn_power_iteration", mutates_args=("u", "v"))
def _power_iteration_op(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n: int,
                        eps: float, order: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_power_iteration`` as one opaque op, used under ``torch.compile`` only.

    With plain tensor ops inside a compiled graph, AOTAutograd's partitioner may save the u/v
    *buffers* for backward and recompute the iteration from them there. The buffers are mutated by
    then (by this very forward), so the gradient comes out silently wrong, and a second forward
    before backward raises an in-place error; PyTorch's own ``spectral_norm`` has the same problem
    (torch 2.14). A custom op is not recomputable, so the graph saves its fresh outputs instead.
    """
    with torch.no_grad(), _fp32_region(w.device.type):
        if n == 0:  # eval mode
            return u.clone(), v.clone(), _sigma(w, u, v)
        return _power_iteration(w, u, v, n, eps, order)


@_power_iteration_op.register_fake
def _power_iteration_fake(w, u, v, n, eps, order):
    return torch.empty_like(u), torch.empty_like(v), w.new_empty(())


def _matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The weight as the (out, -1) matrix whose sigma is taken (a view where the layout allows)."""
    if weight.ndim == 1:
        return weight.unsqueeze(0)
    if dim != 0:
        weight = weight.movedim(dim, 0)
    return weight.reshape(weight.shape[0], -1)


def _unmatrix(matrix: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of ``_matrix``: back to the shape of ``like``."""
    if like.ndim == 1:
        return matrix.reshape(like.shape)
    if dim == 0:
        return matrix.reshape(like.shape)
    return matrix.reshape(like.movedim(dim, 0).shape).movedim(0, dim)


class _DivideBySigma(torch.autograd.Function):
    """(W, u, v, sigma) -> (W / sigma, sigma), where sigma is the value of u^T W v (u, v constants).

    The backward is the paper's gradient (Sec. 2.1, Eq. 12) written out, with d sigma / dW = u v^T:
    dL/dW = G / sigma + (dL/dsigma - <G, W_SN> / sigma) u v^T, G = dL/dW_SN. That is three passes
    over a weight-sized tensor (a dot, a division, a rank-1 update) where autograd through
    ``W / sigma`` and ``u . (W v)`` takes about eight, and they are most of what SN costs in a D step.
    sigma is returned as an output of this function so that the backward, made of differentiable
    ops, also has the right derivatives (double backward).
    """

    @staticmethod
    def forward(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                dim: int):
        return weight / sigma, sigma.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, u, v, _, dim = inputs
        w_sn, sigma = output
        ctx.dim = dim
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(w_sn, u, v, sigma)

    @staticmethod
    def backward(ctx, grad: Optional[torch.Tensor], grad_sigma: Optional[torch.Tensor]):
        w_sn, u, v, sigma = ctx.saved_tensors
        if grad is None and grad_sigma is None:
            return None, None, None, None, None
        with _fp32_region(w_sn.device.type):
            if grad is None:
                g = torch.outer(u * grad_sigma, v)
            else:
                scale = torch.dot(grad.reshape(-1), w_sn.reshape(-1)).div(sigma).neg()
                if grad_sigma is not None:
                    scale = scale + grad_sigma
                g = torch.addr(_matrix(grad, ctx.dim) / sigma, u * scale, v)
            return _unmatrix(g, w_sn, ctx.dim), None, None, None, None


def _sigma(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.dot(u, torch.mv(w, v))


class SpectralNorm(nn.Module):
    """Parametrization W -> W / sigma(W) with an fp32 power iteration (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0,
                 eps: float = 1e-12, warmup_iterations: int = 0, iteration: str = "official") -> None:
        super().__init__()
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        if iteration not in ITERATIONS:
            raise ValueError(f"iteration={iteration!r}; valid: {', '.join(ITERATIONS)}")
        ndim = weight.ndim
        if not -ndim <= dim < ndim:
            raise ValueError(f"dim={dim} out of range for a weight of shape {tuple(weight.shape)}")
        self.dim = dim % ndim if ndim else 0
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.iteration = iteration
        w = self._as_matrix(weight.detach())
        h, wd = w.shape
        u = F.normalize(w.new_empty(h).normal_(0, 1), dim=0, eps=eps)
        v = F.normalize(w.new_empty(wd).normal_(0, 1), dim=0, eps=eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        # sigma of the raw weight from the last forward (for logging; not used for compute).
        self.register_buffer("sigma", torch.ones((), dtype=w.dtype))
        if warmup_iterations and not w.is_meta:  # a meta (structure-only) model has no values to iterate on
            self.warm_up(warmup_iterations, weight)

    def _apply(self, fn, recurse=True):
        # ``module.to(torch.bfloat16)`` / ``.half()`` cast floating buffers too; u, v and sigma must
        # stay fp32 (and keep their fp32 values, not a bf16 round trip), so only the device change
        # of ``fn`` is kept for them. ``.double()`` makes them float64 with the weights.
        before = {k: b for k, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for key, old in before.items():
            new = self._buffers[key]
            if new is not None and new.dtype not in (torch.float32, torch.float64):
                self._buffers[key] = old.to(device=new.device, dtype=torch.float32)
        return self

    @property
    def order(self) -> int:
        return ITERATIONS.index(self.iteration)

    def _as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return _matrix(_wide(weight), self.dim)

    @torch.no_grad()
    def warm_up(self, n: int, weight: torch.Tensor) -> None:
        """``n`` power-iteration steps on ``weight`` (the raw weight), refining u and v."""
        w = self._as_matrix(weight.detach()).to(self._u.dtype)
        _power_iteration(w, self._u, self._v, n, self.eps, self.order)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with _fp32_region(weight.device.type):
            w32 = _wide(weight)
            w = _matrix(w32.detach(), self.dim)
            if torch.compiler.is_compiling():
                # An opaque op (see ``_power_iteration_op``): the graph gets fresh u, v that the
                # compiler can neither recompute from nor alias to the buffers.
                n = self.n_power_iterations if self.training else 0
                u, v, sigma = torch.ops.sngan.sn_power_iteration(w, self._u, self._v, n, self.eps,
                                                                 self.order)
            elif not self.training:
                # Clones: the graph must not hold the buffers that DDP may overwrite.
                u, v = self._u.clone(), self._v.clone()
                sigma = _sigma(w, u, v)
            else:
                # Fresh u, v: the next forward and DDP's broadcast overwrite the buffers only.
                u, v, sigma = _power_iteration(w, self._u, self._v, self.n_power_iterations,
                                               self.eps, self.order)
            w_sn, sigma = _DivideBySigma.apply(w32, u, v, sigma, self.dim)
            self.sigma.copy_(sigma.detach())
        return w_sn.to(weight.dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_power_iterations={self.n_power_iterations}, eps={self.eps}, "
                f"iteration={self.iteration}")


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1,
                  eps: float = 1e-12, dim: int | None = None, warmup_iterations: int = 0,
                  iteration: str = "official") -> nn.Module:
    """Apply spectral normalization to ``module.<name>`` in place and return the module.

    Works for Linear, Conv1d/2d/3d, ConvTranspose (normalizing over the output dim) and Embedding.
    Afterwards ``module.weight`` is the normalized weight.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {type(module).__name__} has no parameter or buffer named '{name}'")
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"'{name}' of {type(module).__name__} is already parametrized")
    if dim is None:
        dim = _default_dim(module)
    parametrize.register_parametrization(
        module, name, SpectralNorm(weight, n_power_iterations, dim, eps, warmup_iterations, iteration))
    return module


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Bake the current normalized weight into a plain parameter."""
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module


def spectral_norm_layers(model: nn.Module) -> Iterator[Tuple[str, SpectralNorm]]:
    """Yield (layer name, SpectralNorm parametrization) for every SN layer of ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, SpectralNorm):
            # "...parametrizations.weight.0" -> owner layer name
            owner = name.split(".parametrizations.")[0]
            yield owner, mod


def sigmas(model: nn.Module) -> Dict[str, float]:
    """sigma(W) of the raw weight of each SN layer, as last estimated (for logging)."""
    return {name: float(sn.sigma) for name, sn in spectral_norm_layers(model)}


def configure_spectral_norm(model: nn.Module, iteration: str = "official", warmup_iterations: int = 0) -> int:
    """Set the power-iteration order of every SN layer of ``model`` and run ``warmup_iterations``
    steps on each (the trainer's ``model.sn_iteration`` / ``model.sn_warmup``); returns the count."""
    if iteration not in ITERATIONS:
        raise ValueError(f"iteration={iteration!r}; valid: {', '.join(ITERATIONS)}")
    count = 0
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for _name, plist in module.parametrizations.items():
            for sn in plist:
                if isinstance(sn, SpectralNorm):
                    sn.iteration = iteration
                    if warmup_iterations and not plist.original.is_meta:
                        sn.warm_up(warmup_iterations, plist.original)
                    count += 1
    return count
