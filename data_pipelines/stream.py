"""The one interface between data and trainer: a per-rank stream of uint8 batches.

A backend is a function ``(cfg, batch_size, rank, world_size, seed, start_batch) -> TrainStream``
registered under a name (``data.backend``). ``start_batch`` is the number of batches this rank has
already consumed (restored from a checkpoint), so a resumed run continues the stream instead of
replaying it from the start.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Protocol, Tuple

import torch

from .config import DataConfig
from .errors import DataInputError

Batch = Tuple[torch.Tensor, torch.Tensor]


class TrainStream(Protocol):
    num_classes: int
    resolution: int

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict: ...


BackendFn = Callable[..., TrainStream]
_BACKENDS: Dict[str, BackendFn] = {}


def register_backend(name: str) -> Callable[[BackendFn], BackendFn]:
    def deco(fn: BackendFn) -> BackendFn:
        _BACKENDS[name] = fn
        return fn
    return deco


def _load_builtin_backends() -> None:
    # Imported lazily so that e.g. a missing optional dependency only matters when chosen.
    from . import synthetic  # noqa: F401
    try:
        from . import wds_loader  # noqa: F401
    except ImportError as exc:  # pragma: no cover - webdataset is a core dependency
        if "wds_loader" not in str(exc):
            raise
    try:
        from . import ffcv_loader  # noqa: F401
    except ImportError as exc:
        if "ffcv_loader" not in str(exc):
            raise


def build_train_stream(cfg: DataConfig, *, batch_size: int, rank: int = 0, world_size: int = 1,
                       seed: int = 0, start_batch: int = 0) -> TrainStream:
    """Build this rank's infinite training stream for ``cfg.backend``."""
    _load_builtin_backends()
    if cfg.backend not in _BACKENDS:
        raise DataInputError(f"data.backend={cfg.backend!r} is not known; valid: {sorted(_BACKENDS)}")
    if batch_size < 1:
        raise DataInputError(f"batch size per rank must be >= 1, got {batch_size}")
    return _BACKENDS[cfg.backend](cfg, batch_size=batch_size, rank=rank, world_size=world_size,
                                  seed=seed, start_batch=start_batch)


def to_model_range(images: torch.Tensor, device: torch.device | str | None = None,
                   channels_last: bool = False, scale: float = 127.5, dequantize: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 on ``device`` (the conversion happens on the device).

    ``scale=127.5``: ``x / 127.5 - 1``, exactly [-1, 1] (the PyTorch GAN convention and the
    evaluator's inverse ``round(127.5 x + 127.5)``). ``scale=128`` with ``dequantize=True`` is the
    official Chainer code's form (sngan_projection ``datasets/``, chainer-gan-lib ``common/dataset``):
    ``x / 128 - 1 + u``, ``u ~ U[0, 1/128)``, so that each of the 256 pixel levels becomes a uniform
    interval of width 1/128 that tiles [-1, 1). The noise is U[0, 1/128) whatever the scale:
    ``scale=127.5`` with ``dequantize=True`` is pytorch-gan-collections' SN-GAN transform
    (``sngan.py:89-93``: ToTensor, Normalize(0.5, 0.5), ``x + rand_like(x) / 128``). ``generator``
    draws the noise (the trainer passes its checkpointed per-rank generator, so a resumed run draws
    the same noise).
    """
    x = images.to(device, non_blocking=True) if device is not None else images
    x = x.float().div_(scale).sub_(1.0)
    if dequantize:
        x.add_(torch.rand(x.shape, device=x.device, generator=generator).div_(128.0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
