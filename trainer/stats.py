"""Statistics reported from anywhere, reduced across ranks once per logging tick.

``Collector.report(name, value)`` accumulates a running sum and count on the device (no sync);
``Collector.reduce()`` all-reduces every series in one call and returns per-name means. Only the
main rank writes them (``MetricsWriter``: ``metrics.jsonl`` and TensorBoard).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from . import dist


class Collector:
    def __init__(self, device: torch.device):
        self.device = device
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, int] = {}

    def report(self, name: str, value) -> None:
        v = value.detach().float().mean() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        v = v.to(self.device)
        if name in self._sums:
            self._sums[name] += v
            self._counts[name] += 1
        else:
            self._sums[name] = v.clone()
            self._counts[name] = 1

    def reduce(self) -> Dict[str, float]:
        """Mean of every series over this tick, over all ranks. Must be called on every rank."""
        # Ranks may have reported different names (rare); agree on the main rank's list.
        names = dist.broadcast_object(sorted(self._sums))
        if not names:
            return {}
        packed = torch.stack([self._sums.get(n, torch.zeros((), device=self.device)) for n in names]
                             + [torch.tensor(float(self._counts.get(n, 0)), device=self.device) for n in names])
        dist.all_reduce_(packed)
        k = len(names)
        sums, counts = packed[:k].tolist(), packed[k:].tolist()
        self._sums.clear()
        self._counts.clear()
        return {n: s / c for n, s, c in zip(names, sums, counts) if c > 0}


class MetricsWriter:
    """metrics.jsonl + TensorBoard on the main rank; a no-op elsewhere."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, step: int, values: Dict[str, float], extra: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **(extra or {}), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)

    def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.enabled:
            self._tb.add_image(tag, image, step)

    def close(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._tb.close()
            self._jsonl.close()
