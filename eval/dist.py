"""The one place in eval/ that knows about ranks.

The evaluator runs the same code under plain ``python`` (one process), ``torchrun`` and
``accelerate launch``; :func:`init` asks accelerate's ``PartialState`` to read the launcher's
environment (gloo on CPU, NCCL on GPUs). Every helper here is a no-op for one process, so call
sites never branch on rank (edm's ``torch_utils/distributed.py`` pattern).
"""

from __future__ import annotations

import atexit
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

# The rank helpers shared with the trainer (trainer/dist.py imports nothing of the training loop).
from trainer.dist import all_reduce_, barrier, broadcast_object, initialized, is_main, print0, rank, world_size

__all__ = ["init", "device", "initialized", "rank", "world_size", "is_main", "print0", "barrier",
           "exact_slice", "all_reduce_sum_", "broadcast_object", "gather_rows", "all_gather_counts"]

_STATE = None


def init():
    """Initialise (once) from the launcher's environment; returns accelerate's PartialState."""
    global _STATE
    if _STATE is None:
        from accelerate import PartialState
        _STATE = PartialState(cpu=not torch.cuda.is_available())
        atexit.register(_shutdown)
    return _STATE


def _shutdown() -> None:
    # Tear the process group down before interpreter finalisation: left to destructors, gloo's
    # threads were sometimes destroyed while joinable and a rank aborted after its work was done
    # ("terminate called without an active exception").
    if initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    dev = torch.device(init().device)
    return torch.device("cpu") if dev.type == "cpu" else dev  # accelerate says "cpu:0" on MULTI_CPU


def exact_slice(total: int, rank_: Optional[int] = None, world: Optional[int] = None) -> Tuple[int, int]:
    """This rank's disjoint, contiguous part ``[start, end)`` of ``range(total)``.

    The parts of all ranks cover every index exactly once (sizes differ by at most one), so no
    padding duplicates enter the statistics.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return total * r // w, total * (r + 1) // w


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks."""
    return all_reduce_(t, "sum")


def gather_rows(rows: torch.Tensor, counts: Sequence[int]) -> Optional[torch.Tensor]:
    """Concatenate every rank's ``rows`` (rank order) on rank 0; ``None`` elsewhere.

    ``counts[r]`` is the number of rows rank ``r`` holds (known from the exact slices), so the
    padding that the collective needs is cut off again before anything is used.
    """
    if not (initialized() and world_size() > 1):
        return rows
    width = max(counts)
    padded = torch.zeros((width,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts: Optional[List[torch.Tensor]] = None
    if is_main():
        parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.gather(padded, parts, dst=0)
    if not is_main():
        return None
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)


def all_gather_counts(n: int, dev: torch.device) -> List[int]:
    """Every rank's ``n`` (e.g. how many rows it holds), on every rank."""
    if not (initialized() and world_size() > 1):
        return [n]
    t = torch.zeros(world_size(), dtype=torch.int64, device=dev)
    t[rank()] = n
    all_reduce_sum_(t)
    return [int(v) for v in t.tolist()]
