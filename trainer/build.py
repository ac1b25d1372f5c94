"""Builds what the loop needs from a resolved config: models, optimizers, LR factor, loss, constraint."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import models
from .config import Config, discriminator_kwargs, generator_kwargs
from .losses import GANLoss, get_loss
from .regularizers import DConstraint, build_constraint


@dataclass
class Parts:
    G: nn.Module
    D: nn.Module
    G_ema: Optional[nn.Module]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    loss: GANLoss
    constraint: DConstraint
    g_kwargs: dict
    d_kwargs: dict


def set_backend_flags(cfg: Config, device: torch.device) -> None:
    """TF32 and cuDNN autotuning (CUDA only; stated in the config: ``train.tf32``, ``train.cudnn_benchmark``)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark


def compile_models(cfg: Config, parts: "Parts") -> None:
    """``torch.compile`` G and D in place (SN's power iteration is one custom op inside the graph),
    with a recompilation guard: after ``train.compile_max_recompiles`` recompilations of a frame,
    dynamo runs it eagerly and logs why (shapes should not change between steps)."""
    import torch._dynamo
    limit = cfg.train.compile_max_recompiles
    for name in ("recompile_limit", "cache_size_limit"):   # the name changed across torch releases
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, limit)
    parts.G.compile()
    parts.D.compile()


def configure_models(cfg: Config, G: nn.Module, D: nn.Module) -> None:
    """The computation choices that are not architecture: SN's power-iteration order and warm-up,
    G's BatchNorm eps (docs/fidelity.md)."""
    models.configure_spectral_norm(D, cfg.model.sn_iteration, cfg.model.sn_warmup)
    models.set_bn_eps(G, cfg.model.bn_eps)


def build_parts(cfg: Config, device: torch.device) -> Parts:
    constraint = build_constraint(cfg.model.d_constraint, cfg.loss.gp_weight, cfg.loss.orth_weight,
                                  cfg.loss.clip_value)
    g_kwargs, d_kwargs = generator_kwargs(cfg), discriminator_kwargs(cfg, constraint)
    # Same init on every rank: models are built from the run seed before DDP (which also broadcasts).
    torch.manual_seed(cfg.train.seed)
    G = models.build_generator(cfg.model.g, **g_kwargs).to(device)
    D = models.build_discriminator(cfg.model.d, **d_kwargs).to(device)
    configure_models(cfg, G, D)
    if cfg.train.channels_last:
        G = G.to(memory_format=torch.channels_last)
        D = D.to(memory_format=torch.channels_last)
    G_ema = None
    if cfg.train.ema_half_life_kimg > 0:
        G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g, opt_d = make_optimizer(cfg, G, cfg.optim.lr_g, device), make_optimizer(cfg, D, cfg.optim.lr_d, device)
    return Parts(G, D, G_ema, opt_g, opt_d, get_loss(cfg.loss.name), constraint, g_kwargs, d_kwargs)


def optimizer_kernels(cfg: Config, device: torch.device) -> dict:
    """``optim.implementation`` as optimizer keyword arguments (``auto``: fused on CUDA, else foreach)."""
    impl = cfg.optim.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]


def make_optimizer(cfg: Config, module: nn.Module, lr: float, device: torch.device = torch.device("cpu")
                   ) -> torch.optim.Optimizer:
    o = cfg.optim
    kernels = optimizer_kernels(cfg, device)
    if o.name == "rmsprop":
        if "fused" in kernels:   # torch has no fused RMSprop: foreach is the fast path there
            kernels = {"foreach": True}
        return torch.optim.RMSprop(module.parameters(), lr=lr, **kernels)
    if o.adam == "chainer":
        from .optim import ChainerAdam
        return ChainerAdam(module.parameters(), lr=lr, betas=(o.beta1, o.beta2), eps=o.eps,
                           foreach="loop" != o.implementation)
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, **kernels)


def lr_factor(cfg: Config, step: int) -> float:
    """Multiplier of the base LR at G step ``step`` (stateless, so resume needs no scheduler state)."""
    o = cfg.optim
    if o.schedule == "constant":
        return 1.0
    end = o.decay_end or cfg.train.steps
    if step <= o.decay_start:
        return 1.0
    if end <= o.decay_start:
        return 0.0
    return max(0.0, 1.0 - (step - o.decay_start) / (end - o.decay_start))
