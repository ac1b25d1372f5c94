"""WebDataset tar shards: a deterministic writer and a fast, truncation-aware reader.

A shard is a POSIX tar whose members are grouped into samples by key: ``KEY.img.jpg`` (the image)
and ``KEY.cls`` (the class index as ASCII), consecutive in the archive. That is the WebDataset
convention, so the shards also read with ``webdataset.WebDataset(...).to_tuple("img.jpg", "cls")``.

Index. Next to each shard the writer stores ``NAME.idx.npy``: one row per sample, ``(image
offset, image size, label, image is JPEG)``. With CIFAR-sized images decoding takes 20-40 us and
walking the tar headers in Python would add a third of that per sample, so the loader uses the
index when it is consistent with the shard and otherwise (third-party shards, damage) parses the
headers itself (:func:`index_shard`), which stops at the last intact sample of a truncated or
overwritten shard instead of yielding garbage. Remote shards (URLs, ``pipe:`` commands) have no
index and are not read whole: :func:`stream_samples` parses a tar stream by the same rules as the
bytes arrive.

Files are written atomically (``NAME.partial`` + fsync + rename): a shard that exists under its
final name is complete.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

BLOCK = 512
# The manifest records the sha256 of each shard's first HEAD_BYTES as well as of the whole shard, so
# that a quick check at load time (one small read per shard) tells a shard from a copy of another.
HEAD_BYTES = 1 << 16
IMAGE_EXTENSIONS = ("img.jpg", "jpg", "jpeg", "png", "webp", "img.png")
LABEL_EXTENSIONS = ("cls", "label", "class")


def atomic_write(path: Path, data: bytes, unique: bool = False) -> None:
    """``data`` into ``path`` through a fsynced temporary file and a rename. ``unique``: the
    temporary name carries this process's id (several processes may write the same file)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial" if unique else f"{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


# Index columns.
COL_OFFSET, COL_SIZE, COL_LABEL, COL_JPEG = range(4)
BAD_LABEL = -(2 ** 62)  # a record whose label member is missing or unreadable


def index_path(shard: str | Path) -> Path:
    return Path(str(shard) + ".idx.npy")


def build_shard(samples: Iterable[Tuple[str, bytes, int]]) -> Tuple[bytes, np.ndarray]:
    """``(key, jpeg_bytes, label)`` triples -> (tar bytes, index). Same input, same bytes (mtime 0,
    no owner), so a shard's sha256 identifies its content."""
    buf = io.BytesIO()
    rows = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpeg, label in samples:
            if len(key) > 80 or "." in key:
                raise ValueError(f"sample key {key!r} must be < 80 characters without dots")
            rows.append((tar.offset + BLOCK, len(jpeg), int(label), 1))  # ustar: one header block
            for name, payload in ((f"{key}.img.jpg", jpeg), (f"{key}.cls", str(int(label)).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o444
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue(), np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def save_index(path: Path, index: np.ndarray) -> None:
    out = io.BytesIO()
    np.save(out, index, allow_pickle=False)
    atomic_write(path, out.getvalue())


class ShardDamaged(Exception):
    """The shard ends in the middle of a member or has a header that fails its checksum."""


@dataclass
class Record:
    """One sample of a shard: where its members lie inside the shard's bytes."""
    key: str
    members: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # extension -> (offset, size)


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.rstrip(b"\0 ").lstrip(b" ")
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == computed


def header_ok(block: bytes) -> bool:
    """True when ``block`` (the first 512 bytes of a file) is an intact tar member header."""
    if len(block) < BLOCK or block.count(0) == BLOCK:
        return False
    return bytes(block[257:262]) == b"ustar" or _checksum_ok(bytes(block[:BLOCK]))


_REGULAR = (48, 0, 55)   # '0', NUL, '7': regular files (others: directories, links, devices)
_META = (76, 120, 103)   # 'L' GNU long name, 'x' / 'g' pax headers


def _member_header(header, pos: int) -> Optional[Tuple[int, int]]:
    """(type flag, data size) of the member header ``header`` found at byte ``pos``; None for the
    end-of-archive marker. Raises :class:`ShardDamaged` for a damaged header."""
    if header[257:262] != b"ustar" and not _checksum_ok(bytes(header)):
        if bytes(header).count(0) == BLOCK:  # end-of-archive marker
            return None
        raise ShardDamaged(f"bad tar header at byte {pos}")
    try:
        return header[156], _octal(bytes(header[124:136]))
    except ValueError:
        raise ShardDamaged(f"bad size field in the tar header at byte {pos}") from None


def _meta_name(kind: int, data, long_name: Optional[str], pos: int) -> Optional[str]:
    """The name that a GNU long-name ('L') or pax ('x', 'g') member at byte ``pos`` gives the next member."""
    if kind == 76:
        try:
            return bytes(data).rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise ShardDamaged(f"undecodable long name in the tar member at byte {pos}") from None
    for line in bytes(data).decode("utf-8", "replace").splitlines():  # pax: only ``path`` matters here
        _, _, kv = line.partition(" ")
        if kv.startswith("path="):
            long_name = kv[5:]
    return long_name


def _header_name(header, pos: int) -> str:
    """The member name of a header at byte ``pos``; a name that is not UTF-8 is damage (the ustar
    magic made the header trusted without its checksum)."""
    try:
        name = bytes(header[:100]).split(b"\0", 1)[0].decode("utf-8")
        if header[345] != 0 and header[257:262] == b"ustar":
            name = bytes(header[345:500]).split(b"\0", 1)[0].decode("utf-8") + "/" + name
    except UnicodeDecodeError:
        raise ShardDamaged(f"undecodable member name in the tar header at byte {pos}") from None
    return name


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def iter_members(buf: bytes) -> Iterator[Tuple[str, int, int]]:
    """``(name, data_offset, size)`` of each regular file in tar bytes ``buf``.

    Raises :class:`ShardDamaged` at the first damaged header or a member cut short by the end of
    ``buf``; every member yielded before that is intact. Headers with the ustar magic (all that this
    writer and Python's tarfile make) are trusted after a size check; others must pass the checksum.
    """
    view = memoryview(buf)
    pos, end = 0, len(buf)
    long_name: Optional[str] = None
    while pos + BLOCK <= end:
        header = view[pos:pos + BLOCK]
        fields = _member_header(header, pos)
        if fields is None:
            return
        kind, size = fields
        data_at = pos + BLOCK
        if data_at + size > end:
            raise ShardDamaged(f"member at byte {pos} needs {size} bytes, shard ends at {end}")
        pos = data_at + _padded(size)
        if kind in _META:
            long_name = _meta_name(kind, view[data_at:data_at + size], long_name, data_at - BLOCK)
            continue
        if kind not in _REGULAR:
            long_name = None
            continue
        name = _header_name(header, data_at - BLOCK) if long_name is None else long_name
        long_name = None
        yield name, data_at, size


def split_key(name: str) -> Tuple[str, str]:
    """WebDataset rule: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_records(buf: bytes) -> Iterator[Record]:
    """Samples of a shard in order. A damaged tail raises :class:`ShardDamaged` after the intact ones."""
    current: Optional[Record] = None
    try:
        for name, offset, size in iter_members(buf):
            key, ext = split_key(name)
            if current is not None and key != current.key:
                yield current
                current = None
            if current is None:
                current = Record(key)
            current.members[ext] = (offset, size)
    except ShardDamaged:
        if current is not None:  # intact members before the damage (a sample missing one is flagged later)
            yield current
        raise
    if current is not None:
        yield current


class _Chunks:
    """A window on a byte stream read in chunks: ``buf[pos:]`` is not parsed yet and ``buf[0]`` is
    byte ``base`` of the stream."""

    def __init__(self, fileobj, chunk: int):
        self.fileobj, self.chunk = fileobj, chunk
        self.buf, self.pos, self.base, self.eof = bytearray(), 0, 0, False

    def need(self, n: int, keep_from: int) -> bool:
        """True once ``buf[pos:pos + n]`` is there, False if the stream ends first. Bytes before
        stream offset ``keep_from`` may be dropped meanwhile."""
        while len(self.buf) - self.pos < n:
            if self.eof:
                return False
            drop = keep_from - self.base
            if drop >= self.chunk:  # amortised: a memmove of what is left, once per chunk or so
                del self.buf[:drop]
                self.pos -= drop
                self.base += drop
            # At most 64 MiB a read: a damaged size field may ask for exabytes.
            data = self.fileobj.read(min(max(self.chunk, n - (len(self.buf) - self.pos)), 1 << 26))
            if data:
                self.buf += data
            else:
                self.eof = True
        return True


def stream_samples(fileobj, chunk: int = 1 << 20) -> Iterator[Tuple[bytearray, Tuple[int, int, int, int]]]:
    """The samples of a tar *stream* (anything with ``read(n)``), parsed as the bytes arrive.

    Yields ``(sample bytes, row)``: the sample's own stretch of the archive (its members' headers
    and data, so :func:`key_at` works on it) and its index row ``(image offset, image size, label,
    is JPEG)`` into those bytes -- what :func:`index_shard` gives for that sample of the whole shard,
    with offsets counted from the sample's start. The rules of :func:`iter_members` and
    :func:`iter_records` hold: a damaged header or a member cut short raises :class:`ShardDamaged`
    after every intact sample (and the intact members of the last one) was yielded, so a truncated
    stream ends at its last intact sample. Memory: about one chunk plus one sample.
    """
    src = _Chunks(fileobj, chunk)
    start = end = 0     # stream offsets: the current sample's first byte, the end of its last member
    current: Optional[Record] = None
    long_name: Optional[str] = None

    def finish() -> Tuple[bytearray, Tuple[int, int, int, int]]:
        sample = src.buf[start - src.base:end - src.base]  # bytearray slice: a copy
        return sample, _record_row(sample, current)

    try:
        while src.need(BLOCK, start):
            header_at = src.base + src.pos
            header = src.buf[src.pos:src.pos + BLOCK]
            fields = _member_header(header, header_at)
            if fields is None:
                break
            kind, size = fields
            if not src.need(BLOCK + size, start):
                raise ShardDamaged(f"member at byte {header_at} needs {size} bytes, "
                                   f"shard ends at {src.base + len(src.buf)}")
            data_at = header_at + BLOCK
            src.pos += BLOCK + _padded(size)
            if kind in _META:
                at = data_at - src.base
                long_name = _meta_name(kind, src.buf[at:at + size], long_name, header_at)
                continue
            if kind not in _REGULAR:
                long_name = None
                continue
            name = _header_name(header, header_at) if long_name is None else long_name
            long_name = None
            key, ext = split_key(name)
            if current is not None and key != current.key:
                yield finish()
                current = None
            if current is None:  # a sample's bytes begin where the previous one's end
                current, start = Record(key), end
            current.members[ext] = (data_at - start, size)
            end = min(data_at + _padded(size), src.base + len(src.buf))
    except ShardDamaged:
        if current is not None:  # intact members before the damage (a sample missing one is flagged later)
            yield finish()
        raise
    if current is not None:
        yield finish()


def read_shard(path: str | Path) -> bytearray:
    """The whole shard in a writable buffer (``torch.frombuffer`` views it without copying)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        got = f.readinto(buf)
    del buf[got:]
    return buf


def record_image(rec: Record) -> Optional[Tuple[str, int, int]]:
    for ext in IMAGE_EXTENSIONS:
        if ext in rec.members:
            return (ext, *rec.members[ext])
    return None


def record_label(buf: bytes, rec: Record) -> int:
    for ext in LABEL_EXTENSIONS:
        if ext in rec.members:
            offset, size = rec.members[ext]
            return int(bytes(buf[offset:offset + size]).strip())
    raise ValueError(f"record {rec.key} has no label member (has {sorted(rec.members)})")


def _record_row(buf: bytes, rec: Record) -> Tuple[int, int, int, int]:
    """The index row ``(image offset, image size, label, is JPEG)`` of a record of ``buf``."""
    image = record_image(rec)
    try:
        label = record_label(buf, rec)
    except ValueError:
        label = BAD_LABEL
    if image is None:
        return 0, 0, label, 0
    ext, offset, size = image
    return offset, size, label, int(ext in ("img.jpg", "jpg", "jpeg"))


def index_shard(buf: bytes) -> Tuple[np.ndarray, Optional[str]]:
    """Parse the tar headers: (index rows of the intact samples, damage message or None).

    A record without an image gets size 0, one without a readable label gets ``BAD_LABEL``; the
    loader counts both as corrupt samples.
    """
    rows, damage = [], None
    try:
        for rec in iter_records(buf):
            rows.append(_record_row(buf, rec))
    except ShardDamaged as exc:
        damage = str(exc)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4), damage


def load_index(shard: str | Path, buf: bytes) -> Tuple[np.ndarray, Optional[str]]:
    """The shard's index: the writer's sidecar when it fits the shard's bytes, else parsed."""
    side = index_path(shard)
    if side.is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                index = np.load(side, allow_pickle=False)
            ends = index[:, COL_OFFSET] + index[:, COL_SIZE]
            if (index.ndim == 2 and index.shape[1] == 4 and len(index)
                    and int(ends.max()) <= len(buf) and int(index[:, COL_OFFSET].min()) >= BLOCK
                    and bytes(buf[int(index[-1, COL_OFFSET]) - BLOCK + 257:][:5]) == b"ustar"):
                return index, None
        except (OSError, ValueError):
            pass  # unreadable sidecar: parse instead
    return index_shard(buf)


def key_at(buf: bytes, offset: int) -> str:
    """Sample key from the ustar header just before a member's data (tests and tools)."""
    name = bytes(buf[offset - BLOCK:offset - BLOCK + 100]).split(b"\0", 1)[0].decode("utf-8", "replace")
    return split_key(name)[0]


def count_records(path: str | Path) -> Tuple[int, List[int]]:
    """(number of intact samples, their labels) of a shard; used when no manifest is available."""
    buf = read_shard(path)
    index, _ = load_index(path, buf)
    labels = [x for x in index[:, COL_LABEL].tolist() if x != BAD_LABEL]
    return len(index), labels
