"""Adam as the official Chainer code computes it (``optim.adam: chainer``).

Chainer's ``AdamRule`` (chainer/optimizers/adam.py, v3 to v7; the official SN-GAN code pins 3.3)
updates, at step t = 1, 2, ...::

    m += (1 - beta1) (g - m)
    v += (1 - beta2) (g^2 - v)
    alpha_t = alpha sqrt(1 - beta2^t) / (1 - beta1^t)
    param -= alpha_t m / (sqrt(v) + eps)

``torch.optim.Adam`` adds eps to the bias-corrected sqrt(v / (1 - beta2^t)) instead, i.e. to a value
larger by 1 / sqrt(1 - beta2^t) (about 10x at t = 1 with beta2 = 0.99, 3.2x with 0.9): the two are the
same only where sqrt(v) >> eps. For SN-GAN's G (tiny gradients on some weights early on) they differ
measurably; docs/fidelity.md gives the measured effect. The state (``step``, ``exp_avg``,
``exp_avg_sq``) has torch's names and shapes, so checkpoints and DCP's optimizer state dicts treat
both the same way.
"""

from __future__ import annotations

import math
from typing import Iterable, Tuple

import torch


class ChainerAdam(torch.optim.Optimizer):
    """Adam with Chainer's eps placement (see the module docstring). ``foreach`` batches the
    element-wise updates over all parameters (the default); the values are the same either way."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, foreach: bool = True) -> None:
        if lr <= 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"ChainerAdam: invalid lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, ms, vs = [], [], [], []
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
            if not params:
                continue
            # One step count per group (every parameter of a group is updated together).
            t = int(self.state[params[0]]["step"].item())
            alpha_t = group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
            if group["foreach"]:
                torch._foreach_add_(ms, torch._foreach_sub(grads, ms), alpha=1.0 - beta1)
                torch._foreach_add_(vs, torch._foreach_sub(torch._foreach_mul(grads, grads), vs),
                                    alpha=1.0 - beta2)
                denom = torch._foreach_add(torch._foreach_sqrt(vs), group["eps"])
                torch._foreach_addcdiv_(params, ms, denom, value=-alpha_t)
            else:
                for p, g, m, v in zip(params, grads, ms, vs):
                    m.add_(g - m, alpha=1.0 - beta1)
                    v.add_(g * g - v, alpha=1.0 - beta2)
                    p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-alpha_t)
        return loss
