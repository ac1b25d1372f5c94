"""Experiment configuration: typed dataclasses, YAML experiments on top of defaults, dotted overrides.

Resolution order: dataclass defaults <- ``launch/experiments/<exp>.yaml`` (which may name a
``base:`` experiment it extends) <- ``key=value`` overrides from the command line. Unknown keys fail
with the key's name and the nearest valid ones; values of the wrong type fail with the expected type.
The resolved config is plain data (``to_dict``) and is written to ``RUN_DIR/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence

import yaml

from data_pipelines.config import DataConfig

from .errors import BadInput

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "launch" / "experiments"


class ConfigError(BadInput, ValueError):
    """A bad experiment name, key or value; the message names it and what would be valid."""


def bounded(default: Any, *, low: Any = None, high: Any = None, low_open: bool = False, high_open: bool = False,
            choices: Sequence[str] = ()) -> Any:
    """A dataclass field with its bounds beside it (ARCHITECTURE.md, practice 8), as ``metadata``:
    ``low``/``high`` (ints: a minimum and a typo guard; floats: a range, ``*_open`` for a strict
    end) or ``choices``. :func:`validate` and :func:`set_key` read them from the fields, so a key and
    its bounds are declared in one place (``data_pipelines/config.py`` writes the same metadata keys)."""
    meta: Dict[str, Any] = {}
    if choices:
        meta["choices"] = tuple(choices)
    if low is not None:
        meta.update(low=low, low_open=low_open)
    if high is not None:
        meta.update(high=high, high_open=high_open)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    g: str = "resnet32"
    d: str = "resnet32"
    num_classes: int = bounded(0, low=0, high=1 << 20)          # 0 = unconditional; >0: conditional BN in G, projection D
    ch: int = bounded(0, low=0, high=1 << 14)  # base width for G and D; 0 = the architecture's default
    g_ch: int = bounded(0, low=0, high=1 << 14)  # overrides ch for G when > 0
    d_ch: int = bounded(0, low=0, high=1 << 14)  # overrides ch for D when > 0
    z_dim: int = bounded(128, low=1, high=1 << 16)
    # How D is constrained (SN-GAN paper, Sec. 4 comparison): sn | wn | orth | clip | gp | none
    d_constraint: str = bounded("sn", choices=("sn", "wn", "orth", "clip", "gp", "none"))
    n_power_iterations: int = bounded(1, low=1, high=1000)
    # Spectral norm's power iteration: official = v from u, then u, sigma = u^T W v, x / (||x|| + eps)
    # (the official Chainer code); torch = the same with x / max(||x||, eps) (torch.nn.utils.spectral_norm);
    # uv = torch's parametrizations.spectral_norm order (u from the stored v first). docs/fidelity.md.
    sn_iteration: str = bounded("official", choices=("official", "torch", "uv"))
    sn_warmup: int = bounded(0, low=0, high=10000)  # power-iteration steps on each SN weight at construction (official: 0)
    # G's BatchNorm eps (2e-5: Chainer's default, the official code; torch's is 1e-5)
    bn_eps: float = bounded(2e-5, low=0.0, low_open=True, high=1.0)
    # G's BatchNorm statistics as on this many processes: each rank's batch is cut into
    # bn_world / world_size slices with statistics of their own (the official ImageNet runs used 4
    # GPUs with per-GPU statistics). 0 = statistics over each rank's whole batch.
    bn_world: int = bounded(0, low=0)
    # Standard-CNN options (models/cnn.py), chainer-gan-lib's choices in cifar10_sngan_cnn:
    # G's BN after the dense layer per channel of the reshaped map or per feature (CGL common/net.py:75);
    # D's leaky-ReLU slope (0 = the architecture's default: 0.1 cnn*, 0.2 dcgan32; CGL: 0.2);
    # the latent distribution, N(0, I) or U[-1, 1] (CGL's default, common/net.py:56).
    g_dense_bn: str = bounded("channel", choices=("channel", "feature"))
    d_slope: float = bounded(0.0, low=0.0, high=1.0, high_open=True)
    z_dist: str = bounded("normal", choices=("normal", "uniform"))


@dataclass
class LossConfig:
    # hinge | wasserstein | ns (non-saturating, "DCGAN"/"KL") | minimax
    name: str = bounded("hinge", choices=("hinge", "wasserstein", "ns", "minimax"))
    gp_weight: float = bounded(10.0, low=0.0)  # WGAN-GP lambda (Gulrajani et al. 2017)
    orth_weight: float = bounded(1e-4, low=0.0)  # orthonormal regularization beta (Brock et al. 2016)
    clip_value: float = bounded(0.01, low=0.0, low_open=True)  # WGAN weight clipping c (Arjovsky et al. 2017)


@dataclass
class OptimConfig:
    name: str = bounded("adam", choices=("adam", "rmsprop"))  # adam | rmsprop (RMSprop is the original WGAN's optimizer)
    # Adam's eps placement: chainer = lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps), as the official
    # Chainer code; torch = torch.optim.Adam, lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps).
    adam: str = bounded("chainer", choices=("chainer", "torch"))
    eps: float = bounded(1e-8, low=0.0, high=1.0)  # Adam's eps (both placements)
    lr_g: float = bounded(2e-4, low=0.0, low_open=True)
    lr_d: float = bounded(2e-4, low=0.0, low_open=True)
    beta1: float = bounded(0.0, low=0.0, high=1.0, high_open=True)
    beta2: float = bounded(0.9, low=0.0, high=1.0, high_open=True)
    # constant | linear (decay to 0 between decay_start and decay_end)
    schedule: str = bounded("constant", choices=("constant", "linear"))
    # Optimizer kernels: auto = fused on CUDA (one kernel for all parameters), foreach elsewhere;
    # fused | foreach | loop force one (the same update, to rounding).
    implementation: str = bounded("auto", choices=("auto", "fused", "foreach", "loop"))
    decay_start: int = bounded(0, low=0)  # G step at which linear decay starts
    decay_end: int = bounded(0, low=0)  # G step at which the LR reaches 0; 0 = train.steps


@dataclass
class TrainConfig:
    steps: int = bounded(1000, low=1)  # G iterations
    batch_size: int = bounded(64, low=1, high=1 << 20)  # global D batch (real images per D step, summed over ranks)
    g_batch_size: int = bounded(0, low=0, high=1 << 20)  # global G batch per G step; 0 = batch_size
    n_dis: int = bounded(5, low=1, high=1000)  # D steps per G step
    # Order within an iteration: g_first = one G step, then n_dis D steps (the official Chainer
    # updaters); d_first = n_dis D steps, then G (pytorch-gan-collections, most PyTorch code).
    update_order: str = bounded("g_first", choices=("g_first", "d_first"))
    precision: str = bounded("fp32", choices=("fp32", "bf16", "fp16"))  # fp32 | bf16 | fp16 (fp16 uses a grad scaler)
    # TF32 for fp32 runs on Ampere+ GPUs (matmuls and convolutions with a 10-bit mantissa): off by
    # default, so that "fp32" means fp32; bf16 is the fast path. No effect on CPU.
    tf32: bool = False
    cudnn_benchmark: bool = True  # cuDNN autotuning of convolution algorithms (CUDA; fixed shapes)
    channels_last: bool = False
    compile: bool = False
    compile_max_recompiles: int = bounded(8, low=1)  # recompilation guard: beyond this, dynamo falls back to eager and says why
    # DDP: rank 0's buffers (G's BN running statistics, SN's u/v) broadcast before every forward;
    # gradients all-reduced in place through bucket views (less memory, one copy less).
    ddp_broadcast_buffers: bool = True
    ddp_bucket_view: bool = True
    seed: int = 0
    ema_half_life_kimg: float = bounded(0.0, low=0.0)  # EMA of G with this half-life in thousands of images; 0 = off
    ema_start_step: int = bounded(0, low=0)
    log_every: int = bounded(10, low=1)
    sample_every: int = bounded(100, low=1)
    ckpt_every: int = bounded(500, low=1)
    keep_ckpts: int = bounded(3, low=1)
    resume: str = "auto"          # auto | none | PATH of a checkpoint folder
    progress: bool = True
    # Experiment trackers, through accelerate's tracker API: any of tensorboard, wandb, mlflow
    # (comma-separated), or none; metrics.jsonl is always written.
    log_with: str = "tensorboard"
    # FID while training: every eval_every-th checkpoint (and the last) is scored by the separate
    # evaluator (a background eval.batch process, or its own SLURM job); 0 = off. The best one by
    # eval_metric is RUN_DIR/best and is never pruned.
    eval_every: int = bounded(0, low=0)
    eval_metric: str = bounded("fid", choices=("fid", "kid", "is", "intra_fid"))  # fid | kid | is | intra_fid
    eval_num_samples: int = bounded(10000, low=2)
    eval_extractor: str = "inception"
    eval_ref: str = ""                # reference statistics .npz; "" = computed once from data.* and cached
    eval_device: str = "auto"         # auto | cpu | cuda:N (a GPU of its own)
    # Fine-tuning: start from the weights of a generator.safetensors, a checkpoint or a run folder
    # (fresh optimizers, step 0); init_strict=false skips tensors whose shape differs, listing them.
    init_from: str = ""
    init_strict: bool = True


@dataclass
class Config:
    exp: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def _declared(obj: Any = None, prefix: str = "") -> Dict[str, Dict[str, Any]]:
    """``{dotted key: its field's bounds metadata}`` for every field that declares some."""
    obj = Config() if obj is None else obj
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_declared(value, f"{prefix}{f.name}."))
        elif f.metadata:
            out[f"{prefix}{f.name}"] = dict(f.metadata)
    return out


def _tables():
    """The bounds declared beside the fields, as the lookup tables the checks use: choices per key;
    ints: minimum and (a typo guard, before memory runs out) maximum; floats: (low, low open?, high
    or None, high open?)."""
    choices, min_int, max_int, float_ranges = {}, {}, {}, {}
    for key, m in _declared().items():
        if "choices" in m:
            choices[key] = m["choices"]
        if "low" not in m:
            continue
        if isinstance(m["low"], int) and not m.get("low_open", False):
            min_int[key] = m["low"]
            if "high" in m:
                max_int[key] = m["high"]
        else:
            float_ranges[key] = (float(m["low"]), m.get("low_open", False), m.get("high"), m.get("high_open", False))
    return choices, min_int, max_int, float_ranges


CHOICES, MIN_INT, MAX_INT, FLOAT_RANGES = _tables()  # declared beside the fields above


def available_experiments() -> List[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def _valid_keys(obj: Any, prefix: str = "") -> List[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(cfg: Config, key: str) -> ConfigError:
    valid = _valid_keys(cfg)
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False,
               "1": True, "0": False}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    target = {"int": int, "float": float, "str": str, "bool": bool}.get(
        annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))
    if target is None:
        return value
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if target in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = target(value)
        except ValueError:
            pass
    if target is str and isinstance(value, bool) and CHOICES.get(key) and ("off" if not value else "on") in CHOICES[key]:
        value = "off" if not value else "on"  # YAML 1.1 reads off/on as booleans
    if target is bool and isinstance(value, str) and value.lower() in _BOOL_WORDS:
        value = _BOOL_WORDS[value.lower()]
    if target is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' expects {target.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    choices = CHOICES.get(key)
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")
    return value


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key (``train.batch_size``) with type checking."""
    parts = key.split(".")
    obj = cfg
    for part in parts[:-1]:
        sub = getattr(obj, part, None)
        if not dataclasses.is_dataclass(sub):
            raise _unknown_key(cfg, key)
        obj = sub
    names = {f.name: f for f in dataclasses.fields(obj)}
    f = names.get(parts[-1])
    if f is None or dataclasses.is_dataclass(getattr(obj, parts[-1])):
        raise _unknown_key(cfg, key)
    hints = typing.get_type_hints(type(obj))
    setattr(obj, parts[-1], _coerce(key, value, hints[f.name]))


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted keys that overrides use."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _load_experiment(name: str, seen: Sequence[str] = ()) -> Dict[str, Any]:
    path = Path(name) if name.endswith((".yaml", ".yml")) else EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        near = difflib.get_close_matches(name, available_experiments(), n=3)
        raise ConfigError(f"unknown experiment '{name}'"
                          + (f"; did you mean {', '.join(near)}?" if near else "")
                          + f" (available: {', '.join(available_experiments())})")
    if str(path) in seen:
        raise ConfigError(f"experiment '{name}' extends itself through 'base:'")
    try:
        with open(path) as fh:
            tree = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:  # malformed YAML, or a tag such as !!python/object (never constructed)
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not a valid experiment YAML file{at}: {problem}; experiment files hold "
                          f"plain mappings of keys to numbers, strings and booleans") from None
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: an experiment file must be a mapping of sections")
    base = tree.pop("base", None)
    flat = _load_experiment(base, (*seen, str(path))) if base else {}
    flat.update(flatten(tree))
    return flat


def parse_override(text: str) -> tuple:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.batch_size=32)")
    key, raw = text.split("=", 1)
    if raw.strip().lower() in ("on", "off", "yes", "no", "y", "n"):
        return key.strip(), raw.strip()  # YAML 1.1 would make these booleans; the key's type decides
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(exp: str = "default", overrides: Sequence[str] = ()) -> Config:
    cfg = Config()
    for key, value in _load_experiment(exp).items():
        set_key(cfg, key, value)
    cfg.exp = Path(exp).stem if exp.endswith((".yaml", ".yml")) else exp
    for text in overrides:
        set_key(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Every value in range and the models buildable, before anything runs; the message names the key."""
    import math
    for key, low in MIN_INT.items():
        value = _get(cfg, key)
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
        high = MAX_INT.get(key)
        if high is not None and value > high:
            raise ConfigError(f"{key}={value} is larger than {high}; a typo?")
    for key, (low, strict_low, high, strict_high) in FLOAT_RANGES.items():
        value = _get(cfg, key)
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        if value < low or (strict_low and value == low):
            raise ConfigError(f"{key} must be {'>' if strict_low else '>='} {low:g}, got {value:g}")
        if high is not None and (value > high or (strict_high and value == high)):
            raise ConfigError(f"{key} must be {'<' if strict_high else '<='} {high:g}, got {value:g}")
    t = cfg.train
    from .stats import parse_log_with
    try:
        parse_log_with(t.log_with)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if t.resume not in ("auto", "none") and not os.path.isdir(t.resume):
        raise ConfigError(f"train.resume must be auto, none or an existing checkpoint folder; "
                          f"{t.resume!r} is not a folder")
    _validate_models(cfg)


def generator_kwargs(cfg: Config) -> dict:
    """G's constructor keywords from the config (here, not in build.py: the config check builds G and D
    on the meta device, and build.py imports this module)."""
    kw = {"num_classes": cfg.model.num_classes, "z_dim": cfg.model.z_dim}
    ch = cfg.model.g_ch or cfg.model.ch
    if ch:
        kw["ch"] = ch
    # Standard-CNN options, passed only when set (other generators do not take them).
    if cfg.model.g_dense_bn != "channel":
        kw["dense_bn"] = cfg.model.g_dense_bn
    if cfg.model.z_dist != "normal":
        kw["z_dist"] = cfg.model.z_dist
    return kw


def discriminator_kwargs(cfg: Config, constraint) -> dict:
    """D's constructor keywords; ``constraint`` is a ``trainer.regularizers.DConstraint``."""
    kw = {"num_classes": cfg.model.num_classes, "norm": constraint.layer_norm}
    if constraint.layer_norm == "sn":
        kw["n_power_iterations"] = cfg.model.n_power_iterations
    ch = cfg.model.d_ch or cfg.model.ch
    if ch:
        kw["ch"] = ch
    if cfg.model.d_slope:
        kw["slope"] = cfg.model.d_slope
    return kw


def _validate_models(cfg: Config) -> None:
    """Build G and D on the meta device (no memory, no compute) to check names and sizes."""
    import torch

    import models
    from .regularizers import build_constraint
    m = cfg.model
    for kind, name, valid in (("g", m.g, models.generator_names()), ("d", m.d, models.discriminator_names())):
        if name not in valid:
            near = difflib.get_close_matches(name, valid, n=3)
            raise ConfigError(f"model.{kind}={name!r} is not a known architecture; valid: {', '.join(valid)}"
                              + (f" (did you mean {', '.join(near)}?)" if near else ""))
    constraint = build_constraint(m.d_constraint)
    try:
        with torch.device("meta"):
            G = models.build_generator(m.g, **generator_kwargs(cfg))
            D = models.build_discriminator(m.d, **discriminator_kwargs(cfg, constraint))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model.g={m.g} / model.d={m.d} cannot be built with these sizes "
                          f"(ch={m.ch}, g_ch={m.g_ch}, d_ch={m.d_ch}, z_dim={m.z_dim}, "
                          f"num_classes={m.num_classes}): {exc}") from None
    for who, module in (("g", G), ("d", D)):
        res = getattr(module, "resolution", None)
        if res is not None and res != cfg.data.resolution:
            raise ConfigError(f"model.{who}={getattr(m, who)} works at {res}x{res} px but data.resolution="
                              f"{cfg.data.resolution}; set data.resolution={res} or choose a "
                              f"{cfg.data.resolution} px model ({_models_at(cfg.data.resolution)})")


def _models_at(resolution: int) -> str:
    import torch

    import models
    names = []
    with torch.device("meta"):
        for name in models.generator_names():
            try:
                if getattr(models.build_generator(name), "resolution", None) == resolution:
                    names.append(name)
            except Exception:
                pass
    return "available: " + ", ".join(names) if names else "none exists"


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
