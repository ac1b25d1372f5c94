"""Run an extractor over this rank's images and reduce the results over ranks.

:class:`Collector` accumulates sufficient statistics (always) and, only when a metric needs them,
the features (KID; with ``feature_index`` only those of the listed global indices, the bounded
subset that precision/recall/density/coverage use) or logits (IS) with their global sample
indices. :meth:`Collector.finish` sums the statistics with one all_reduce and gathers kept rows
onto rank 0 in global index order, so the result does not depend on the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from trainer import dist
from .extractors import FeatureExtractor
from .stats import SufficientStats


@dataclass
class Collected:
    stats: SufficientStats                  # reduced, identical on every rank
    features: Optional[torch.Tensor] = None  # rank 0 only: float32 [N, d] in global index order
    logits: Optional[torch.Tensor] = None    # rank 0 only


def _ordered(rows: List[torch.Tensor], index: List[torch.Tensor], width: int, dev) -> Optional[torch.Tensor]:
    local = torch.cat(rows) if rows else torch.zeros(0, width)
    idx = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64)
    counts = dist.all_gather_counts(local.shape[0], dev)
    every = dist.gather_rows(local.to(dev), counts)
    every_idx = dist.gather_rows(idx.to(dev), counts)
    if every is None:
        return None
    return every[torch.argsort(every_idx)].cpu()


class Collector:
    def __init__(self, extractor: FeatureExtractor, device, groups: int = 1, *,
                 keep_features: bool = False, keep_logits: bool = False,
                 feature_index: Optional[torch.Tensor] = None):
        self.extractor, self.device = extractor, torch.device(device)
        self.feature_index = None if feature_index is None else torch.as_tensor(feature_index, dtype=torch.int64)
        self.stats = SufficientStats(extractor.dim, groups, self.device)
        self.keep_features, self.keep_logits = keep_features, keep_logits
        self._feats: List[torch.Tensor] = []
        self._logits: List[torch.Tensor] = []
        self._index: List[torch.Tensor] = []
        self._findex: List[torch.Tensor] = []

    @torch.no_grad()
    def add(self, images: torch.Tensor, group: Optional[torch.Tensor] = None,
            index: Optional[torch.Tensor] = None) -> None:
        """``images`` uint8 ``[B, 3, H, W]``; ``group`` per-sample group ids; ``index`` global ids."""
        feats, logits = self.extractor(images.to(self.device, non_blocking=True))
        self.stats.add(feats, group)
        if self.keep_features or self.keep_logits:
            if index is None:
                raise ValueError("keeping features or logits needs the samples' global indices")
            index = index.cpu()
            self._index.append(index)
            if self.keep_features:
                if self.feature_index is not None:  # the features of the listed indices only
                    keep = torch.isin(index, self.feature_index)
                    self._feats.append(feats[keep.to(feats.device)].float().cpu())
                    self._findex.append(index[keep])
                else:
                    self._feats.append(feats.float().cpu())
                    self._findex.append(index)
            if self.keep_logits:
                if logits is None:
                    raise ValueError(f"extractor {self.extractor.name!r} gives no logits (IS)")
                self._logits.append(logits.float().cpu())

    def finish(self) -> Collected:
        self.stats.all_reduce_()
        out = Collected(self.stats)
        dev = dist.device()
        if self.keep_features:
            out.features = _ordered(self._feats, self._findex, self.extractor.dim, dev)
        if self.keep_logits:
            out.logits = _ordered(self._logits, self._index, self.extractor.num_logits, dev)
        self._feats, self._logits, self._index, self._findex = [], [], [], []
        return out
