"""The one adapter between our checkpoints and torch.distributed.checkpoint (DCP): data, never code.

DCP stores a checkpoint as ``.distcp`` files plus a ``.metadata`` file. Two of its read paths
unpickle with the full pickle machinery, so a crafted checkpoint could run code on load:

- ``FileSystemReader.read_metadata`` calls ``pickle.load`` on ``.metadata`` (torch 2.14). A sha256
  in ``meta.json`` does not help: it lives beside the file, so whoever writes the file writes the
  checksum too. :class:`SafeFileSystemReader` reads it with :class:`MetadataUnpickler`, which admits
  only the DCP metadata classes, torch dtypes / layouts / sizes, ``pathlib`` paths and plain
  containers; anything else raises :class:`UnsafeCheckpoint` naming the file and the global.
- ``DefaultLoadPlanner.load_bytes`` unpickles non-tensor entries with ``torch.load(weights_only=False)``;
  :class:`WeightsOnlyLoadPlanner` uses ``weights_only=True`` (tensors already load that way).

Both subclass DCP classes and re-implement one method each; ``tests/test_checkpoint_safety.py``
pins that they read what DCP itself reads (same metadata, same loaded state), so a change in a
torch release shows up as a failing test here rather than as a silent difference. The private
helper ``set_element`` is used only here.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .errors import BadInput

__all__ = ["UnsafeCheckpoint", "MetadataUnpickler", "SafeFileSystemReader", "WeightsOnlyLoadPlanner",
           "CheckpointException", "is_checkpoint_exception"]

try:  # torch >= 2.2; a BaseException, so ``except Exception`` misses it
    from torch.distributed.checkpoint.api import CheckpointException
except ImportError:  # pragma: no cover - older torch
    class CheckpointException(BaseException):  # type: ignore[no-redef]
        pass


class UnsafeCheckpoint(BadInput, ValueError):
    """A checkpoint file that asks the unpickler for something other than plain data."""


# (module, name) pairs the DCP metadata of this trainer's checkpoints needs; see the test that
# lists what a real checkpoint asks for.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),     # string -> torch.layout lookup, no side effects
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and refuses every other global (functions, arbitrary classes)."""

    def __init__(self, file, source: str = "<stream>"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpoint(f"{self.source}: refers to {module}.{name}, which is not checkpoint "
                               f"metadata; refusing to load it (a checkpoint is data, never code)")


def load_metadata(stream, source: str) -> Metadata:
    try:
        metadata = MetadataUnpickler(stream, source).load()
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # truncated or garbage bytes: pickle raises many types
        raise UnsafeCheckpoint(f"{source}: not readable DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{source}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` uses :class:`MetadataUnpickler` (see module doc)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles byte entries with weights_only=False; this one never does."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def is_checkpoint_exception(exc: BaseException) -> bool:
    return isinstance(exc, CheckpointException)


def unwrap(exc: BaseException) -> BaseException:
    """The first rank's original exception inside a DCP ``CheckpointException`` (else ``exc``)."""
    if isinstance(exc, CheckpointException):
        for _rank, pair in sorted(exc.failures.items()):
            inner = pair[0] if isinstance(pair, tuple) else pair
            if isinstance(inner, BaseException):
                return inner
    return exc
