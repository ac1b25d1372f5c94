"""Raw images -> shards -> per-rank training streams.

The trainer only calls :func:`build_train_stream`; every backend returns an iterable that yields
``(images, labels)`` with images ``uint8 [B, 3, H, W]`` and labels ``int64 [B]`` for *this rank*, and
has ``state_dict()`` / position semantics described in :mod:`data_pipelines.stream`.
"""

from __future__ import annotations

from .config import DataConfig
from .stream import TrainStream, build_train_stream, register_backend, to_model_range

__all__ = ["DataConfig", "TrainStream", "build_train_stream", "register_backend", "to_model_range"]
