"""The one place that knows about ranks: is_main(), print0(), barrier(), reductions.

Call sites never branch on rank themselves (edm's torch_utils/distributed.py pattern). Everything
works without an initialised process group (one process).
"""

from __future__ import annotations

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
