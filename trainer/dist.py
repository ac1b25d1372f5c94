"""The one place that knows about ranks and process groups, for the trainer, the evaluator and the
tools: is_main(), print0(), barrier(), reductions, the gloo control group, and the evaluator's
launcher-driven :func:`init` / :func:`device` with its exact slices and gathers.

Call sites never branch on rank themselves (edm's torch_utils/distributed.py pattern; ARCHITECTURE.md,
practice 4). Everything works without an initialised process group (one process). The trainer's
process group is created by ``trainer/main.py`` (accelerate); the evaluator's by :func:`init`. This
module imports nothing of the training loop, so the evaluator may use it.
"""

from __future__ import annotations

import atexit
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if initialized() and world_size() > 1:
        dist.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all_reduce (sum or max); no-op for one process."""
    if initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


_CONTROL_GROUP = None


def _control_group():
    """A gloo group for small CPU-side agreements (created on first use, collectively): flags reduced
    there never wait for the GPU, whereas an all_reduce on the NCCL group plus ``.item()`` would be
    a host sync in every step."""
    global _CONTROL_GROUP
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _CONTROL_GROUP


def shutdown() -> None:
    """Destroy the process group (and the control group with it), all ranks together: a rank that
    tears gloo down while a peer still finishes its last collective can abort the peer's process
    ("terminate called without an active exception")."""
    global _CONTROL_GROUP
    if initialized():
        try:
            barrier()
        finally:
            dist.destroy_process_group()
    _CONTROL_GROUP = None


def any_rank(flag: bool, device: torch.device = None) -> bool:
    """True on every rank if ``flag`` is true on any rank (a CPU all_reduce: no GPU sync)."""
    if not (initialized() and world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group())
    return bool(t.item() > 0)


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    if not (initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(message):
    """The first rank's non-None error message, on every rank (None when no rank has one)."""
    if not (initialized() and world_size() > 1):
        return message
    every = [None] * world_size()
    dist.all_gather_object(every, message)
    return next((m for m in every if m), None)


# ----------------------------------------------------------------------------- the evaluator's ranks
# The evaluator runs the same code under plain ``python`` (one process), ``torchrun`` and
# ``accelerate launch``; :func:`init` asks accelerate's ``PartialState`` to read the launcher's
# environment (gloo on CPU, NCCL on GPUs).

_STATE = None


def init():
    """Initialise (once) from the launcher's environment; returns accelerate's PartialState."""
    global _STATE
    if _STATE is None:
        from accelerate import PartialState
        _STATE = PartialState(cpu=not torch.cuda.is_available())
        atexit.register(_shutdown_at_exit)
    return _STATE


def _shutdown_at_exit() -> None:
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
