"""The training loop. The D/G schedule is data: a list of phases (ARCHITECTURE.md, practice 1).

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
from data_pipelines.verify import check_training_data

from . import checkpoint, dist
from .build import Parts, lr_factor
from .config import Config, ConfigError, to_dict
from .ema import EMA, copy_weights
from .samples import fixed_inputs, render_grid, save_grid
from .evaluation import InTrainingEval
from .stats import Collector, MetricsWriter, parse_log_with

from .errors import EXIT_OK, EXIT_PREEMPTED, BadInput, Diverged, StorageFailure


class TrainingDiverged(Diverged, RuntimeError):
    pass


class StorageError(StorageFailure, RuntimeError):
    """A write into the run folder failed (full disk, quota, I/O error); checkpoints before it are intact."""


class DataMismatch(BadInput, ValueError):
    """The data does not fit the model or config (resolution, classes); found before the first step."""


@dataclass
class ResumePlan:
    """What ``train()`` decided before building anything: the checkpoint to load (or None), its meta,
    the config keys that changed since it was written, and whether optimizer states carry over."""
    path: Optional[str] = None
    meta: Optional[dict] = None
    changed: Optional[dict] = None
    fresh_optimizers: bool = False


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


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Logits to at least fp32 for the loss (bf16/fp16 up; a float64 model stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


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
        self._set_bn_slices(cfg.model.bn_world)
        self.images_per_step = t.n_dis * t.batch_size + g_batch  # real images + G images, global
        self.num_classes = cfg.model.num_classes
        self.z_dim = parts.G.z_dim
        self.z_dist = getattr(parts.G, "z_dist", "normal")   # model.z_dist (chainer-gan-lib's CNN: uniform)
        self.ckpt_root = os.path.join(run_dir, "checkpoints")
        self.step, self.images_seen = 0, 0
        self.gen = torch.Generator(device).manual_seed(t.seed * 1000 + self.rank + 1)
        self.stats = Collector(device)
        self.writer = None   # opened by prepare(), after every check has passed
        self.ema = EMA(t.ema_half_life_kimg * 1000) if parts.G_ema is not None else None
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
        self.autocast = dict(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        scaler_on = t.precision == "fp16"
        # Checkpoints keep the D phase's scaler as "scaler_d", whatever the order (``_state``).
        d_phase = Phase("D", parts.D, parts.G, parts.opt_d, torch.amp.GradScaler(device.type, enabled=scaler_on),
                        t.n_dis, self._d_loss, parts.constraint.after_step)
        g_phase = Phase("G", parts.G, parts.D, parts.opt_g, torch.amp.GradScaler(device.type, enabled=scaler_on),
                        1, self._g_loss)
        # train.update_order: the official updaters run the G step first, then n_dis D steps.
        self.phases: List[Phase] = [g_phase, d_phase] if t.update_order == "g_first" else [d_phase, g_phase]
        self.phase = {"D": d_phase, "G": g_phase}
        self.base_lr = {ph.name: [g["lr"] for g in ph.opt.param_groups] for ph in self.phases}
        self.stream = None
        self.data_iter = None
        # Where this rank's data stream starts: batch index and seed (prepare(); resume() may move them).
        self._start_batch, self._data_seed = 0, t.seed
        self._batch_checked = False
        self.in_eval = None
        self.eval_summary = None
        self.status: Optional[int] = None   # run()'s exit status (trainer.errors.EXIT_OK / EXIT_PREEMPTED)

    def _set_bn_slices(self, bn_world: int) -> None:
        """``model.bn_world``: G's BN statistics per slice, as on ``bn_world`` processes (docs/fidelity.md)."""
        if not bn_world:
            return
        if bn_world % self.world:
            dist.print0(f"[trainer] warning: model.bn_world={bn_world} is not a multiple of the {self.world} process(es): "
                        f"G's BatchNorm statistics cover each rank's whole batch ({self.d_batch} / {self.g_batch} "
                        f"samples), not the {bn_world}-process setting's")
            return
        k = bn_world // self.world
        for name, batch in (("train.batch_size", self.d_batch), ("train.g_batch_size", self.g_batch)):
            if batch % k or batch // k < 2:
                raise ConfigError(f"model.bn_world={bn_world} cuts each rank's batch into {k} slices, but {name} gives "
                                  f"{batch} per rank, which {'is not divisible by' if batch % k else 'is too small for'} {k}")
        models.set_bn_splits(self.p.G, k)
        if k > 1:
            dist.print0(f"[trainer] G's BatchNorm: statistics per slice of {self.d_batch // k} (D step) / "
                        f"{self.g_batch // k} (G step) samples, as on {bn_world} processes (model.bn_world)")

    # ----------------------------------------------------------------- inputs
    # One method per input of a step, so that a replay of recorded inputs (tests/golden/harness.py)
    # can feed another implementation's exact batches and noise through the same computation.
    def _d_inputs(self):
        """Real images and labels, then the latents and labels of the D step's fakes."""
        real, y_real = self._real()
        z, y_fake = self._latents(self.d_batch)
        return real, y_real, z, y_fake

    def _g_inputs(self):
        return self._latents(self.g_batch)

    def _gp_alpha(self, n: int) -> torch.Tensor:
        """WGAN-GP's interpolation weights, one per sample, from the run's checkpointed generator."""
        return torch.rand(n, device=self.device, generator=self.gen)

    def _latents(self, n: int):
        z = models.sample_z(n, self.z_dim, self.z_dist, generator=self.gen, device=self.device)
        y = (torch.randint(self.num_classes, (n,), device=self.device, generator=self.gen)
             if self.num_classes > 0 else None)
        return z, y

    def _real(self):
        images, labels = next(self.data_iter)
        if not self._batch_checked:  # the stream's first batch: the size the model will really see
            want = (self.d_batch, 3, self.cfg.data.resolution, self.cfg.data.resolution)
            if tuple(images.shape) != want:
                raise DataMismatch(f"the data stream gives batches of shape {tuple(images.shape)}, the model "
                                   f"expects {want} (data.resolution={self.cfg.data.resolution})")
            self._batch_checked = True
        d = self.cfg.data
        x = to_model_range(images, self.device, self.cfg.train.channels_last, d.pixel_scale, d.dequantize, self.gen)
        y = labels.to(self.device, non_blocking=True) if self.num_classes > 0 else None
        return x, y

    # ----------------------------------------------------------------- losses
    def _d_loss(self) -> torch.Tensor:
        real, y_real, z, y_fake = self._d_inputs()
        with torch.autocast(**self.autocast):
            with torch.no_grad():
                fake = self.p.G(z, y_fake)
            d_real = self.D_ddp(real, y_real)
            d_fake = self.D_ddp(fake, y_fake)
            loss = self.p.loss.d_loss(_wide(d_real), _wide(d_fake))
            if self.p.constraint.penalty is not None:
                alpha = self._gp_alpha(real.shape[0]) if self.p.constraint.name == "gp" else None
                penalty = self.p.constraint.penalty(self.p.D, real, fake, y_real, alpha)
                self.stats.report(f"loss/d_{self.p.constraint.name}", penalty)
                loss = loss + penalty
        self.stats.report("loss/d", loss)
        self.stats.report("D/real", _wide(d_real).mean())
        self.stats.report("D/fake", _wide(d_fake).mean())
        return loss

    def _g_loss(self) -> torch.Tensor:
        z, y = self._g_inputs()
        with torch.autocast(**self.autocast):
            fake = self.G_ddp(z, y)
            loss = self.p.loss.g_loss(_wide(self.p.D(fake, y)))
        self.stats.report("loss/g", loss)
        return loss

    # ----------------------------------------------------------------- state
    def _state(self):
        p = self.p
        state = {"G": p.G.state_dict(), "D": p.D.state_dict(),
                 "opt_g": get_optimizer_state_dict(p.G, p.opt_g),
                 "opt_d": get_optimizer_state_dict(p.D, p.opt_d),
                 "scaler_d": self.phase["D"].scaler.state_dict(),
                 "scaler_g": self.phase["G"].scaler.state_dict(),
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
        full = to_dict(cfg)
        meta = {"images_seen": self.images_seen, "model": full["model"], "exp": cfg.exp, "config": full}
        return checkpoint.save(self.ckpt_root, self.step, state, rank_state, meta, export, cfg.train.keep_ckpts,
                               protect=self.protected_checkpoints())

    def protected_checkpoints(self) -> List[str]:
        """Checkpoints that pruning keeps whatever ``train.keep_ckpts`` says: the best one and those
        waiting for their in-training evaluation."""
        if self.in_eval is None:
            return []
        return self.in_eval.protected(checkpoint.list_checkpoints(self.ckpt_root))

    def resume(self, plan: ResumePlan) -> Optional[str]:
        """Load ``plan.path`` (already chosen and verified by ``train()``) into every part."""
        path = plan.path
        if path is None:
            return None
        state, rank_state = self._state()
        if plan.fresh_optimizers:  # another optimizer class: its saved states do not apply
            del state["opt_g"], state["opt_d"]
        meta = checkpoint.load(path, state, rank_state, verified=True)
        p = self.p
        if plan.fresh_optimizers:
            dist.print0("optimizer changed (optim.name): G and D optimizers start with fresh states")
        else:
            try:
                set_optimizer_state_dict(p.G, p.opt_g, state["opt_g"])
                set_optimizer_state_dict(p.D, p.opt_d, state["opt_d"])
            except (KeyError, ValueError, RuntimeError) as exc:
                raise checkpoint.CheckpointError(f"{path}: its optimizer states do not fit this optimizer "
                                                 f"({type(exc).__name__}: {exc})") from None
        for ph, key in ((self.phase["D"], "scaler_d"), (self.phase["G"], "scaler_g")):
            if state[key] and ph.scaler.is_enabled():  # a disabled scaler (fp32/bf16) has no state
                ph.scaler.load_state_dict(state[key])
        self.step = int(state["progress"]["step"])
        self.images_seen = int(state["progress"]["images_seen"])
        saved_world = meta.get("world_size")
        same_world = meta["rank_state_loaded"] and saved_world == self.world
        if same_world:
            self.gen.set_state(rank_state["gen"])
            torch.set_rng_state(rank_state["torch_cpu"])
            if "cuda" in rank_state:
                torch.cuda.set_rng_state(rank_state["cuda"], self.device)
            self._start_batch, self._data_seed = int(rank_state["data_batches"]), self.cfg.train.seed
            dist.print0(f"resumed from {path} at step {self.step} ({self.images_seen} images seen)")
        else:
            # New world size: fresh per-rank streams, seeded by the step so no epoch start is replayed.
            self.gen.manual_seed(self.cfg.train.seed * 1000 + self.rank + 1 + 7919 * self.step)
            self._start_batch, self._data_seed = 0, self.cfg.train.seed + self.step
            dist.print0(f"resumed from {path} at step {self.step} ({self.images_seen} images seen); the world "
                        f"size changed from {saved_world} to {self.world} process(es): weights, optimizer states "
                        f"and progress are restored exactly, the data and noise streams of every rank were "
                        f"reseeded from the step (a different, not a replayed, sample order)")
        return path

    def prepare(self, plan: ResumePlan) -> None:
        """Everything before the first step: resume, the data stream and the checks that need it.

        Raises before ``config.yaml`` is written when the data does not fit the model.
        """
        cfg, t = self.cfg, self.cfg.train
        self._start_batch, self._data_seed = 0, t.seed
        self.resume(plan)
        if plan.path is None and t.init_from:
            from .finetune import init_from
            modules = {"G": self.p.G, "D": self.p.D, **({"G_ema": self.p.G_ema} if self.p.G_ema is not None else {})}
            for line in init_from(t.init_from, modules, t.init_strict):
                dist.print0(f"[trainer] {line}")
        elif plan.path is not None and t.init_from:
            dist.print0(f"[trainer] train.init_from is ignored: the run resumes from its own checkpoint {plan.path}")
        error = None
        if dist.is_main():
            try:
                check_training_data(cfg.data)   # data.verify: the files against their manifest
            except ValueError as exc:
                error = exc
        error = dist.broadcast_object(error)
        if error is not None:
            raise DataMismatch(str(error))
        self.stream = build_train_stream(cfg.data, batch_size=self.d_batch, rank=self.rank, world_size=self.world,
                                         seed=self._data_seed, start_batch=self._start_batch)
        self._check_data()
        self.data_iter = iter(self.stream)

    def _check_data(self) -> None:
        cfg, p = self.cfg, self.p
        data_classes = getattr(self.stream, "num_classes", 0) or 0
        if cfg.model.num_classes and data_classes and data_classes != cfg.model.num_classes:
            raise DataMismatch(f"model.num_classes={cfg.model.num_classes} but the data ({cfg.data.path or cfg.data.backend}) "
                               f"has {data_classes} classes; set model.num_classes={data_classes}")
        if cfg.model.num_classes and not data_classes and cfg.data.backend != "synthetic":
            raise DataMismatch(f"model.num_classes={cfg.model.num_classes} but the data ({cfg.data.path}) has no "
                               f"class labels; set model.num_classes=0 for an unconditional model")
        res = cfg.data.resolution
        for who, name, module in (("G", cfg.model.g, p.G), ("D", cfg.model.d, p.D)):
            model_res = getattr(module, "resolution", None)
            if model_res is not None and model_res != res:
                what = "makes" if who == "G" else "takes"
                raise DataMismatch(f"model.{who.lower()}={name} {what} {model_res}x{model_res} images but "
                                   f"data.resolution={res}; use a {res} px model or data.resolution={model_res} "
                                   f"(with data prepared at >= {model_res} px)")
        stored = getattr(self.stream, "stored_resolution", None)
        if stored and stored < res:
            raise DataMismatch(f"{cfg.data.path} holds {stored}x{stored} images; training at data.resolution={res} "
                               f"would upsample every image. Prepare the data at >= {res} px "
                               f"(python -m data_pipelines.prepare ... --resolution {res}) or train a {stored} px model")

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
        try:
            self.writer.write(self.step, values, {"images_seen": self.images_seen})
            self._log_eval()
        except OSError as exc:
            raise StorageError(f"could not append to {os.path.join(self.run_dir, 'metrics.jsonl')}: "
                               f"{checkpoint.storage_reason(exc, self.run_dir)}") from None
        if bar is not None:
            bar.set_postfix({"img/s": f"{values['perf/images_per_s']:.0f}", "loss_d": f"{values.get('loss/d', 0):.3f}",
                             "loss_g": f"{values.get('loss/g', 0):.3f}"}, refresh=False)

    def _sample(self, z, y) -> None:
        error = None
        if dist.is_main():
            G = self.p.G_ema if self.p.G_ema is not None else self.p.G
            grid = render_grid(G, z, y)
            path = os.path.join(self.run_dir, "samples", f"step-{self.step:09d}.png")
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_grid(grid, path)
                self.writer.add_image("samples", grid, self.step)
            except OSError as exc:
                error = f"could not write the sample grid {path}: {checkpoint.storage_reason(exc, self.run_dir)}"
        error = dist.first_error(error)
        if error:
            raise StorageError(error)

    def save_or_raise(self) -> str:
        try:
            return self.save()
        except checkpoint.CheckpointWriteError as exc:
            raise StorageError(str(exc)) from None

    # ----------------------------------------------------------------- the loop
    def run(self) -> int:
        """Train from the prepared state to ``train.steps``; EXIT_OK, or EXIT_PREEMPTED after a stop signal.

        The stop flag is read after every step (also a step that just wrote its periodic
        checkpoint), so a signal costs at most one step and one checkpoint. The checkpoint is written
        before the sample grid: a full disk must not cost the checkpoint.
        """
        cfg, t = self.cfg, self.cfg.train
        from .config import flatten
        self.writer = MetricsWriter(self.run_dir, enabled=dist.is_main(), log_with=parse_log_with(t.log_with),
                                    name=cfg.exp, config=flatten(to_dict(cfg)))
        self.in_eval = InTrainingEval(cfg, self.run_dir, enabled=dist.is_main())
        self.in_eval.start()
        z_fixed, y_fixed = fixed_inputs(self.z_dim, self.num_classes, seed=t.seed, z_dist=self.z_dist)
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
                last = self.step == t.steps
                if self.step % t.log_every == 0 or last:
                    self._log(bar, t_last, steps_since)
                    t_last, steps_since = time.perf_counter(), 0
                saved = None
                if self.step % t.ckpt_every == 0 or last:
                    saved = self.save_or_raise()
                if self.step % t.sample_every == 0 or last:
                    self._sample(z_fixed, y_fixed)
                if not last and dist.any_rank(self.stop_requested(), self.device):
                    path = saved or self.save_or_raise()
                    dist.print0(f"stop signal: checkpoint {path} written at step {self.step}; exiting")
                    status = EXIT_PREEMPTED
                    break
            if status == EXIT_OK and self.in_eval.enabled:
                self.in_eval.wait(self.step)
                self._log_eval()
                self.eval_summary = self.in_eval.summary(self.step)
        finally:
            if bar is not None:
                bar.close()
            self.in_eval.stop()
            self.writer.close()
        return status

    def _log_eval(self) -> None:
        """Results of the in-training evaluation, at their checkpoints' steps (main rank only)."""
        for rec in self.in_eval.poll():
            self.writer.write(rec["step"], self.in_eval.scalars(rec), {"checkpoint": rec["checkpoint"]})

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
