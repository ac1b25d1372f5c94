"""Shards from anywhere the ``webdataset`` package opens: ``http(s)://`` URLs and ``pipe:`` commands.

``data.path`` forms handled here (local folders, patterns and globs are :mod:`.manifest`'s):

- ``https://host/dir/shard-{000000..001023}.tar`` (``http://`` too, and the other schemes of
  ``webdataset.gopen``: ``gs://``, ``ais://``, ``hf://``, ``sftp://``, ``scp://``, ...);
- ``pipe:COMMAND``, the command writing one shard to stdout, e.g.
  ``pipe:aws s3 cp s3://bucket/shard-{000000..000099}.tar -`` or ``pipe:cat /data/shard-{000..009}.tar``;
- ``https://host/dir/manifest.json`` (or ``https://host/dir/``): the shards that manifest lists.

The string means what it means to ``webdataset.WebDataset(urls)``: it is expanded by
``webdataset.shardlists.expand_urls`` (brace ranges, ``::``-separated lists, ``${VAR}`` from
``WDS_VAR``) and every shard is opened by ``webdataset.gopen`` (``curl -f -s -L`` with retries for
the http family, a shell for ``pipe:`` -- so a ``pipe:`` path runs that command, as WebDataset
does). Nothing here speaks HTTP or spawns processes itself.

Counting. The loader's SlotPlan needs every shard's sample count. They come from the
``manifest.json`` at the same place as the shards (the first shard's address with its file name
replaced: ``https://host/dir/manifest.json``, ``pipe:aws s3 cp s3://bucket/manifest.json -``),
fetched through the same opener, when it lists every shard; otherwise each shard is streamed once
at start-up to count it (said in a warning; the manifest written by ``data_pipelines.prepare``
next to the shards avoids it).

Reading. A remote shard has no ``.idx.npy`` beside it and is not read into memory first: its tar
stream is parsed as it arrives (:func:`.tario.stream_samples`, the same rules as the local parser,
so a truncated stream ends at its last intact sample) and every sample keeps just its own bytes.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
from typing import Iterator, List, Optional, Tuple

from .manifest import MANIFEST_NAME, MANIFEST_VERSION, ShardSet
from .tario import BAD_LABEL, ShardDamaged, stream_samples
from .errors import DataInputError, DataMissing

log = logging.getLogger("data_pipelines.wds")

# A shard's (or the manifest's) file name inside a URL or command: the last path component ending
# in .tar / manifest.json, followed by the end, a space, a quote, a query or a shell separator.
_FILE_NAME = re.compile(r"(?<![^/\s'\"=])(?:[^/\s'\"=]+\.tar|" + re.escape(MANIFEST_NAME) + r")(?=$|[\s'\"?#&;|)])")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_remote(path: str) -> bool:
    """True for a ``pipe:`` command or a URL whose scheme ``webdataset.gopen`` opens. A URL of
    another scheme is refused with the ones that work (``s3://`` wants ``pipe:aws s3 cp URL -``)."""
    if path.startswith("pipe:"):
        return True
    if not _URL.match(path) or path.startswith("file://"):
        return False
    from webdataset import gopen_schemes
    scheme = path.split(":", 1)[0].lower()
    if scheme not in gopen_schemes or scheme == "__default__":
        known = sorted(k for k in gopen_schemes if not k.startswith("_"))
        raise DataInputError(f"data.path {path!r}: webdataset cannot open {scheme}:// URLs (it opens "
                         f"{', '.join(k + '://' for k in known if k != 'pipe')} and pipe:COMMAND); "
                         f"e.g. pipe:aws s3 cp s3://bucket/shard-000000.tar - for S3")
    return True


def expand(path: str) -> List[str]:
    """The shard URLs of ``data.path``, expanded as ``webdataset.WebDataset(path)`` expands them."""
    from webdataset.shardlists import expand_urls
    try:
        return list(expand_urls(path))
    except AssertionError as exc:  # envsubst: ${VAR} without WDS_VAR in the environment
        raise DataInputError(f"data.path {path!r}: {exc}") from None


class Opened:
    """A shard or manifest opened by ``webdataset.gopen``.

    Reads go straight to the reader's pipe (the ``stream`` of gopen's ``Pipe``): ``Pipe.read``
    polls the reader after every read and raises once it has failed, dropping the bytes that read
    returned, so which intact samples before a failed transfer arrive would depend on timing. The
    exit status is checked once instead, at the end of the stream (:meth:`finish`). Local files
    (what gopen returns for a plain path) are read as they are.
    """

    def __init__(self, url: str):
        from webdataset import gopen
        self.handle = gopen(url, "rb")
        self.read = getattr(self.handle, "stream", self.handle).read

    def finish(self, limit: int) -> bool:
        """Read on to the end (at most ``limit`` more bytes) and close there, which waits for the
        reader and raises OSError if it failed (curl's HTTP 404, a connection cut short): a failed
        transfer must not pass for an empty or a truncated shard. False: more bytes than that were
        left (the reader is stopped by :meth:`abandon`)."""
        while limit > 0:
            data = self.read(min(limit, 1 << 16))
            if not data:
                self.handle.close()
                return True
            limit -= len(data)
        return False

    def abandon(self) -> None:
        """Close a stream that is no longer wanted. Its reader process (``Pipe.proc``) is stopped
        first: closing alone waits for it to exit, which a reader waiting on a stalled server may
        not do for a long time. Its exit status means nothing then."""
        proc = getattr(self.handle, "proc", None)
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
            self.handle.close()
        except Exception:
            pass


def transfer_error(exc: BaseException) -> str:
    """A short description of a failed read (gopen's message repeats the whole command)."""
    text = str(exc)
    m = re.search(r"exit (-?\d+)", text)
    if m:
        code = int(m.group(1))
        hint = {22: " (curl: HTTP status >= 400, e.g. 404)", 6: " (curl: host not found)",
                7: " (curl: connection refused)", 18: " (curl: transfer cut short)",
                127: " (command not found)"}.get(code, "")
        return f"the reader exited with status {code}{hint}"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def url_samples(url: str) -> Iterator[Tuple[bytearray, Tuple[int, int, int, int]]]:
    """``(sample bytes, index row)`` of the shard at ``url`` as it streams in (see
    :func:`.tario.stream_samples`); the reader is stopped with the generator. A failed transfer
    raises OSError after every sample that arrived intact, a damaged shard ShardDamaged."""
    opened = Opened(url)
    try:
        try:
            yield from stream_samples(opened)
        except ShardDamaged:
            opened.finish(1)  # at the end of the stream: was it cut short by a failed transfer?
            raise
        opened.finish(1 << 20)  # the end-of-archive blocks and padding after the last sample
    finally:
        opened.abandon()


def with_file_name(url: str, name: str) -> Optional[str]:
    """``url`` with its shard / manifest file name replaced by ``name`` (None: no file name in it)."""
    if url.endswith("/"):
        return url + name
    found = list(_FILE_NAME.finditer(url))
    if not found:
        return None
    m = found[-1]
    return url[:m.start()] + name + url[m.end():]


def file_name(url: str) -> Optional[str]:
    found = list(_FILE_NAME.finditer(url))
    return found[-1].group(0) if found else None


def fetch_manifest(url: str) -> Tuple[Optional[dict], str]:
    """(the manifest at ``url`` or None, why not)."""
    opened = None
    try:
        opened = Opened(url)
        chunks = []
        while True:
            data = opened.read(1 << 20)
            if not data:
                break
            chunks.append(data)
        opened.finish(1)
        text = b"".join(chunks)
    except (OSError, ValueError) as exc:
        return None, transfer_error(exc)
    finally:
        if opened is not None:
            opened.abandon()
    try:
        manifest = json.loads(text)
    except ValueError:
        return None, "not readable JSON" if text else "nothing there"
    version = manifest.get("manifest_version") if isinstance(manifest, dict) else None
    if version != MANIFEST_VERSION:
        return None, f"manifest_version {version!r}, this code reads {MANIFEST_VERSION}"
    return manifest, ""


def _count_one(url: str) -> Tuple[int, List[int]]:
    """(samples, their readable labels) of one remote shard, streamed once; damage ends it there."""
    n, labels = 0, []
    samples = url_samples(url)
    try:
        for _, (_, _, label, _) in samples:
            n += 1
            if label != BAD_LABEL:
                labels.append(label)
    except ShardDamaged:
        pass  # counted up to the damage, as count_records counts a local shard
    except (OSError, ValueError) as exc:
        if n == 0:
            raise DataMissing(f"cannot read shard {url}: {transfer_error(exc)}") from None
        log.warning("counting %s: transfer failed after %d samples (%s); counting those", url, n, transfer_error(exc))
    finally:
        samples.close()
    return n, labels


def count_shards(urls: List[str], threads: int = 8) -> Tuple[List[int], int]:
    """(samples per shard, number of classes) by streaming each shard once (a few at a time)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        results = list(pool.map(_count_one, urls))
    max_label = max([-1] + [max(labels) for _, labels in results if labels])
    return [n for n, _ in results], max_label + 1


def first_images(url: str, n: int) -> List[bytes]:
    """The image bytes of the first ``n`` samples of a remote shard (fewer if it has fewer)."""
    out: List[bytes] = []
    samples = url_samples(url)
    try:
        for sample, (offset, size, _, _) in samples:
            if size > 0:
                out.append(bytes(sample[offset:offset + size]))
            if len(out) >= n:
                break
    except (ShardDamaged, OSError, ValueError):
        pass
    finally:
        samples.close()
    return out


def _from_manifest(manifest: dict, where: str) -> None:
    if manifest.get("format") != "webdataset":
        raise DataInputError(f"{where!r} describes a {manifest.get('format')!r} dataset; use "
                         f"data.backend={manifest.get('format')} or write shards with --format webdataset")


def resolve_remote(path: str, announce: bool = True) -> ShardSet:
    """``data.path`` (a URL pattern, ``pipe:`` command or manifest URL) -> its shards and counts."""
    if path.endswith("/") or file_name(path) == MANIFEST_NAME:
        url = with_file_name(path, MANIFEST_NAME)
        manifest, why = fetch_manifest(url)
        if manifest is None:
            raise DataMissing(f"data.path {path!r}: cannot read {url}: {why}")
        _from_manifest(manifest, url)
        urls = [with_file_name(url, s["name"]) for s in manifest["shards"]]
        return ShardSet(urls, [int(s["samples"]) for s in manifest["shards"]], int(manifest["num_classes"]),
                        manifest.get("resolution"), manifest, remote=True)
    urls = expand(path)
    if not urls:
        raise DataMissing(f"data.path {path!r} names no shards")
    url = with_file_name(urls[0], MANIFEST_NAME)
    manifest, why = fetch_manifest(url) if url else (None, "no file name in the shard address")
    if manifest is not None:
        _from_manifest(manifest, url)
        listed = {s["name"]: int(s["samples"]) for s in manifest.get("shards", [])}
        names = [file_name(u) for u in urls]
        missing = [n for n in names if n not in listed]
        if not missing:
            return ShardSet(urls, [listed[n] for n in names], int(manifest["num_classes"]),
                            manifest.get("resolution"), manifest, remote=True)
        why = f"it does not list {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if announce:
        log.warning("no usable %s at %s (%s): counting the samples of %d remote shards by streaming each once; "
                    "put the %s written by data_pipelines.prepare beside the shards to start at once",
                    MANIFEST_NAME, url or "the shards", why, len(urls), MANIFEST_NAME)
    counts, num_classes = count_shards(urls)
    return ShardSet(urls, counts, num_classes, None, None, remote=True)
