"""The training loop. The D/G schedule is data: a list of phases (STYLE practice 1).

Each phase names the module it trains, its optimizer and grad scaler, how many times it repeats per
G iteration (SN-GAN's n_dis for D, 1 for G), and a function that returns its loss. The loop alone
owns zero_grad / requires_grad / backward / step.

DDP: in the D phase D runs through its DDP wrapper and G (no grad) unwrapped; in the G phase G runs
through its wrapper and D unwrapped with ``requires_grad=False``. So each backward only ever
all-reduces the module being trained, and D's two forwards (real, then fake, as in the paper's code)
happen before one backward. D's spectral-norm vectors stay identical on all ranks: DDP broadcasts
rank 0's buffers before every D forward, and every rank runs the same deterministic power
iteration on the same weights in between. G's BatchNorm running statistics are per-rank (local
batches) and re-synchronised from rank 0 at every G forward; samples and checkpoints use rank 0's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

import models
from models.export import save_generator
from data_pipelines import build_train_stream, to_model_range

from . import checkpoint, dist
from .build import Parts, lr_factor
from .config import Config, to_dict
from .ema import EMA, copy_weights
from .samples import fixed_inputs, render_grid, save_grid
from .stats import Collector, MetricsWriter

EXIT_OK = 0
EXIT_PREEMPTED = 75          # EX_TEMPFAIL: checkpoint saved on a stop signal; run again to continue


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class Phase:
    name: str
    module: nn.Module                 # unwrapped module trained by this phase
    other: nn.Module                  # unwrapped module frozen during this phase
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    repeats: int
    loss_fn: Callable[[], torch.Tensor]
    after_step: Optional[Callable[[nn.Module], None]] = None


def _grad_norm(module: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class Loop:
    def __init__(self, cfg: Config, parts: Parts, G_ddp: nn.Module, D_ddp: nn.Module,
                 device: torch.device, run_dir: str, stop_requested: Callable[[], bool] = lambda: False):
        self.cfg, self.p, self.device, self.run_dir = cfg, parts, device, run_dir
        self.G_ddp, self.D_ddp = G_ddp, D_ddp
        self.stop_requested = stop_requested
        self.world, self.rank = dist.world_size(), dist.rank()
        t = cfg.train
        g_batch = t.g_batch_size or t.batch_size
        for name, value in (("train.batch_size", t.batch_size), ("train.g_batch_size", g_batch)):
            if value % self.world:
                raise ValueError(f"{name}={value} is not divisible by the world size {self.world}")
        self.d_batch, self.g_batch = t.batch_size // self.world, g_batch // self.world
        self.images_per_step = t.n_dis * t.batch_size + g_batch  # real images + G images, global
        self.num_classes = cfg.model.num_classes
        self.z_dim = parts.G.z_dim
        self.ckpt_root = os.path.join(run_dir, "checkpoints")
        self.step, self.images_seen = 0, 0
        self.gen = torch.Generator(device).manual_seed(t.seed * 1000 + self.rank + 1)
        self.stats = Collector(device)
        self.writer = MetricsWriter(run_dir, enabled=dist.is_main())
        self.ema = EMA(t.ema_half_life_kimg * 1000) if parts.G_ema is not None else None
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
        self.autocast = dict(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        scaler_on = t.precision == "fp16"
        self.phases: List[Phase] = [
            Phase("D", parts.D, parts.G, parts.opt_d, torch.amp.GradScaler(device.type, enabled=scaler_on),
                  t.n_dis, self._d_loss, parts.constraint.after_step),
            Phase("G", parts.G, parts.D, parts.opt_g, torch.amp.GradScaler(device.type, enabled=scaler_on),
                  1, self._g_loss),
        ]
        self.base_lr = {ph.name: [g["lr"] for g in ph.opt.param_groups] for ph in self.phases}
        self.stream = None
        self.data_iter = None

    # ----------------------------------------------------------------- inputs
    def _latents(self, n: int):
        z = torch.randn(n, self.z_dim, device=self.device, generator=self.gen)
        y = (torch.randint(self.num_classes, (n,), device=self.device, generator=self.gen)
             if self.num_classes > 0 else None)
        return z, y

    def _real(self):
        images, labels = next(self.data_iter)
        x = to_model_range(images, self.device, self.cfg.train.channels_last)
        y = labels.to(self.device, non_blocking=True) if self.num_classes > 0 else None
        return x, y

    # ----------------------------------------------------------------- losses
    def _d_loss(self) -> torch.Tensor:
        real, y_real = self._real()
        z, y_fake = self._latents(self.d_batch)
        with torch.autocast(**self.autocast):
            with torch.no_grad():
                fake = self.p.G(z, y_fake)
            d_real = self.D_ddp(real, y_real)
            d_fake = self.D_ddp(fake, y_fake)
            loss = self.p.loss.d_loss(d_real.float(), d_fake.float())
            if self.p.constraint.penalty is not None:
                penalty = self.p.constraint.penalty(self.p.D, real, fake, y_real)
                self.stats.report(f"loss/d_{self.p.constraint.name}", penalty)
                loss = loss + penalty
        self.stats.report("loss/d", loss)
        self.stats.report("D/real", d_real.float().mean())
        self.stats.report("D/fake", d_fake.float().mean())
        return loss

    def _g_loss(self) -> torch.Tensor:
        z, y = self._latents(self.g_batch)
        with torch.autocast(**self.autocast):
            fake = self.G_ddp(z, y)
            loss = self.p.loss.g_loss(self.p.D(fake, y).float())
        self.stats.report("loss/g", loss)
        return loss

    # ----------------------------------------------------------------- state
    def _state(self):
        p = self.p
        state = {"G": p.G.state_dict(), "D": p.D.state_dict(),
                 "opt_g": get_optimizer_state_dict(p.G, p.opt_g),
                 "opt_d": get_optimizer_state_dict(p.D, p.opt_d),
                 "scaler_d": self.phases[0].scaler.state_dict(),
                 "scaler_g": self.phases[1].scaler.state_dict(),
                 "progress": {"step": torch.tensor(self.step), "images_seen": torch.tensor(self.images_seen)}}
        if p.G_ema is not None:
            state["G_ema"] = p.G_ema.state_dict()
        rank_state = {"gen": self.gen.get_state(), "torch_cpu": torch.get_rng_state(),
                      "data_batches": torch.tensor(self.stream.state_dict()["batches"] if self.stream else 0)}
        if self.device.type == "cuda":
            rank_state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state, rank_state

    def save(self) -> str:
        self._check_finite()
        state, rank_state = self._state()
        p, cfg = self.p, self.cfg
        modules = {"G": p.G, **({"G_ema": p.G_ema} if p.G_ema is not None else {})}
        info = {"step": self.step, "images_seen": self.images_seen, "exp": cfg.exp}
        export = lambda path: save_generator(path, cfg.model.g, p.g_kwargs, modules, info)  # noqa: E731
        meta = {"images_seen": self.images_seen, "model": to_dict(cfg)["model"], "exp": cfg.exp}
        return checkpoint.save(self.ckpt_root, self.step, state, rank_state, meta, export, cfg.train.keep_ckpts)

    def resume(self) -> Optional[str]:
        mode = self.cfg.train.resume
        path = checkpoint.find_resume(self.ckpt_root) if mode == "auto" else (None if mode == "none" else mode)
        if path is None:
            return None
        meta = checkpoint.read_meta(path)
        want = to_dict(self.cfg)["model"]
        if meta.get("model") != want:
            diff = {k: (meta.get("model", {}).get(k), v) for k, v in want.items() if meta.get("model", {}).get(k) != v}
            raise checkpoint.CheckpointError(f"{path} was trained with another model config "
                                             f"(checkpoint vs now: {diff}); use another --out or train.resume=none")
        state, rank_state = self._state()
        meta = checkpoint.load(path, state, rank_state)
        p = self.p
        set_optimizer_state_dict(p.G, p.opt_g, state["opt_g"])
        set_optimizer_state_dict(p.D, p.opt_d, state["opt_d"])
        self.phases[0].scaler.load_state_dict(state["scaler_d"])
        self.phases[1].scaler.load_state_dict(state["scaler_g"])
        self.step = int(state["progress"]["step"])
        self.images_seen = int(state["progress"]["images_seen"])
        same_world = meta["rank_state_loaded"] and meta.get("world_size") == self.world
        if same_world:
            self.gen.set_state(rank_state["gen"])
            torch.set_rng_state(rank_state["torch_cpu"])
            if "cuda" in rank_state:
                torch.cuda.set_rng_state(rank_state["cuda"], self.device)
            self._start_batch, self._data_seed = int(rank_state["data_batches"]), self.cfg.train.seed
        else:
            # New world size: fresh per-rank streams, seeded by the step so no epoch start is replayed.
            self.gen.manual_seed(self.cfg.train.seed * 1000 + self.rank + 1 + 7919 * self.step)
            self._start_batch, self._data_seed = 0, self.cfg.train.seed + self.step
        dist.print0(f"resumed from {path} at step {self.step} ({self.images_seen} images seen)")
        return path

    # ----------------------------------------------------------------- checks and outputs
    def _check_finite(self) -> None:
        bad = int(self.first_bad_step.max().item()) if self.world == 1 else int(
            dist.all_reduce_(self.first_bad_step.clone().float(), "max").item())
        if bad >= 0:
            last = checkpoint.list_checkpoints(self.ckpt_root)
            keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint had been written"
            raise TrainingDiverged(f"non-finite loss (NaN/inf) at step {bad + 1}; stopping; {keep}")

    def _log(self, bar, t_last: float, steps_done: int) -> None:
        values = self.stats.reduce()
        for name, sigma in models.sigmas(self.p.D).items():
            values[f"sigma/{name}"] = sigma
        for ph in self.phases:
            values[f"lr/{ph.name}"] = ph.opt.param_groups[0]["lr"]
        elapsed = max(time.perf_counter() - t_last, 1e-9)
        values["perf/images_per_s"] = steps_done * self.images_per_step / elapsed
        values["perf/s_per_step"] = elapsed / max(steps_done, 1)
        skipped = getattr(self.stream, "skipped", None)
        if skipped is not None:
            values["data/skipped"] = float(dist.all_reduce_(torch.tensor(float(skipped))).item())
        self._check_finite()
        self.writer.write(self.step, values, {"images_seen": self.images_seen})
        if bar is not None:
            bar.set_postfix({"img/s": f"{values['perf/images_per_s']:.0f}", "loss_d": f"{values.get('loss/d', 0):.3f}",
                             "loss_g": f"{values.get('loss/g', 0):.3f}"}, refresh=False)

    def _sample(self, z, y) -> None:
        if not dist.is_main():
            return
        G = self.p.G_ema if self.p.G_ema is not None else self.p.G
        grid = render_grid(G, z, y)
        os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
        save_grid(grid, os.path.join(self.run_dir, "samples", f"step-{self.step:09d}.png"))
        self.writer.add_image("samples", grid, self.step)

    # ----------------------------------------------------------------- the loop
    def run(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        self._start_batch, self._data_seed = 0, t.seed
        self.resume()
        self.stream = build_train_stream(cfg.data, batch_size=self.d_batch, rank=self.rank, world_size=self.world,
                                         seed=self._data_seed, start_batch=self._start_batch)
        if cfg.model.num_classes and getattr(self.stream, "num_classes", 0) and \
                self.stream.num_classes != cfg.model.num_classes:
            raise ValueError(f"model.num_classes={cfg.model.num_classes} but the data has "
                             f"{self.stream.num_classes} classes")
        self.data_iter = iter(self.stream)
        z_fixed, y_fixed = fixed_inputs(self.z_dim, self.num_classes, seed=t.seed)
        bar = None
        if dist.is_main() and t.progress:
            from tqdm import tqdm
            bar = tqdm(total=t.steps, initial=self.step, unit="it", dynamic_ncols=True,
                       mininterval=1.0 if os.isatty(2) else 10.0, desc=cfg.exp)
        t_last, steps_since = time.perf_counter(), 0
        status = EXIT_OK
        try:
            while self.step < t.steps:
                status = self._iteration()
                steps_since += 1
                if bar is not None:
                    bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self._log(bar, t_last, steps_since)
                    t_last, steps_since = time.perf_counter(), 0
                if self.step % t.sample_every == 0 or self.step == t.steps:
                    self._sample(z_fixed, y_fixed)
                if self.step % t.ckpt_every == 0 or self.step == t.steps:
                    self.save()
                elif dist.any_rank(self.stop_requested(), self.device):
                    path = self.save()
                    dist.print0(f"stop signal: checkpoint {path} written at step {self.step}; exiting")
                    status = EXIT_PREEMPTED
                    break
        finally:
            if bar is not None:
                bar.close()
            self.writer.close()
        return status

    def _iteration(self) -> int:
        lr = lr_factor(self.cfg, self.step)
        for ph in self.phases:
            for group, base in zip(ph.opt.param_groups, self.base_lr[ph.name]):
                group["lr"] = base * lr
            ph.other.requires_grad_(False)
            ph.module.requires_grad_(True)
            log_grads = (self.step + 1) % self.cfg.train.log_every == 0
            for _ in range(ph.repeats):
                ph.opt.zero_grad(set_to_none=True)
                loss = ph.loss_fn()
                self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss.detach()),
                                                  torch.full_like(self.first_bad_step, self.step), self.first_bad_step)
                ph.scaler.scale(loss).backward()
                if log_grads:
                    ph.scaler.unscale_(ph.opt)
                    self.stats.report(f"grad_norm/{ph.name}", _grad_norm(ph.module))
                ph.scaler.step(ph.opt)
                ph.scaler.update()
                if ph.after_step is not None:
                    ph.after_step(ph.module)
        self.step += 1
        self.images_seen += self.images_per_step
        if self.ema is not None:
            if self.step <= self.cfg.train.ema_start_step:
                copy_weights(self.p.G_ema, self.p.G)
            else:
                self.ema.update(self.p.G_ema, self.p.G, self.cfg.train.g_batch_size or self.cfg.train.batch_size)
        return EXIT_OK
