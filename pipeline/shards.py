"""Shards: expand the user's patterns (local paths, or URLs: s3:// and any fsspec scheme, webdataset's
`pipe:` and https://), make sure each has a DALI index file, count its samples, and pick this rank's share.

The index file (DALI's `wds2idx` format) is the single source of truth for which samples a shard
holds: both decoders produce exactly one row per index entry, and the writer expects that count. A
remote shard's index is built by streaming the object once and kept in the local index cache, under a
name made of its URL, size and ETag, so a replaced object is indexed again.
"""

from __future__ import annotations

import glob
import gc
import hashlib
import logging
import multiprocessing
import os
import tarfile
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import braceexpand
from wds2idx import IndexCreator

from pipeline.errors import UserError
from pipeline.layout import filesystem, is_remote, is_url, object_version, open_input

log = logging.getLogger(__name__)

PLAIN_TAR = (".tar",)
COMPRESSED_TAR = (".tar.gz", ".tgz")


@dataclass(frozen=True)
class Shard:
    path: str
    name: str  # file name without extension: the output is <name>.parquet
    index_path: str | None = None
    count: int | None = None  # samples, from the index; None when the shard could not be indexed
    error: str | None = None  # why it could not be indexed
    extensions: frozenset[str] = frozenset()  # every component extension in the shard, as written

    @property
    def is_plain_tar(self) -> bool:
        return self.path.endswith(PLAIN_TAR)

    @property
    def is_remote(self) -> bool:
        return is_remote(self.path)


@dataclass(frozen=True)
class ShardIndex:
    """A shard's samples in tar order: each one's key and component extensions, and where its data ends."""

    keys: list[str]
    extensions: list[list[str]]
    end: int  # the byte after the last component's data
    spans: list[list[tuple[int, int]]] | None = None  # (offset, size) of each component, when asked for


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns, globs, single paths or URLs, lists of those, or a .txt file of them → sorted."""
    items = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for item in items:
        item = str(item) if is_remote(str(item)) else os.path.expanduser(str(item))
        if item.endswith(".txt") and _is_file(item):
            with (open_input(item) if is_remote(item) else open(item, "rb")) as f:
                lines = [ln.strip() for ln in f.read().decode().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            paths.extend(expand_shards(lines) if lines else [])
            continue
        for pattern in braceexpand.braceexpand(item):
            paths.extend(_glob(pattern) if glob.has_magic(pattern.split("://")[-1]) else [pattern])
    # kept even when missing: a missing shard becomes a failed shard, not a lost one
    paths = sorted(set(p if is_remote(p) else os.path.abspath(p) for p in paths))
    if not any(_exists(paths)):
        raise UserError(f"data.shards={spec!r} matches no file")
    names: dict[str, str] = {}
    for p in paths:
        name = shard_name(p)
        if name in names:
            raise UserError(f"two shards share the name {name!r} ({names[name]} and {p}); outputs would collide")
        names[name] = p
    return paths


def _glob(pattern: str) -> list[str]:
    if not is_url(pattern):
        return glob.glob(pattern)
    fs, inner = filesystem(pattern)
    return [fs.unstrip_protocol(p) for p in fs.glob(inner)]


def _is_file(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, inner = filesystem(path)
    return fs.isfile(inner)


def _exists(paths: list[str]) -> list[bool]:
    """Whether each path exists; remote objects by one listing per folder rather than a request each.
    `pipe:` commands and http(s) URLs cannot be listed: they count as existing."""
    listed: dict[str, set[str]] = {}
    found = []
    for p in paths:
        if not is_url(p) or p.startswith(("http://", "https://")):
            found.append(p.startswith(("pipe:", "http://", "https://")) or os.path.exists(p))
            continue
        folder = p.rsplit("/", 1)[0]
        if folder not in listed:
            fs, inner = filesystem(folder)
            try:
                listed[folder] = {fs.unstrip_protocol(x) for x in fs.ls(inner, detail=False)}
            except FileNotFoundError:
                listed[folder] = set()
        found.append(p in listed[folder])
    return found


def shard_name(path: str) -> str:
    base = os.path.basename(path.split("://", 1)[-1].split("?", 1)[0].rstrip("/"))
    for ext in COMPRESSED_TAR + PLAIN_TAR:
        if base.endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]


def assign_to_rank(paths: list[str], rank: int, world_size: int) -> list[str]:
    """Round-robin over the sorted list: deterministic and disjoint, so any rank can be rerun alone."""
    return sorted(paths)[rank::world_size]


def index_path_for(path: str, cache_dir: str | None, version: str = "") -> str:
    """`<shard>.idx` beside a local shard when that folder is writable, else in the cache folder; a
    remote shard's in the cache folder, named after its URL and `version` (size and ETag)."""
    if not is_remote(path):
        beside = os.path.join(os.path.dirname(path), shard_name(path) + ".idx")
        if os.path.exists(beside) or os.access(os.path.dirname(path), os.W_OK):
            return beside
    if cache_dir is None:
        cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "shardscore", "index")
    key = path if is_remote(path) else os.path.abspath(path)
    digest = hashlib.sha1(f"{key}|{version}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{shard_name(path)}-{digest}.idx")


class BackgroundIndexing:
    """Local shards without a fresh index, indexed by forked processes while this one loads the model
    (listing a tar holds Python's GIL, so threads would not run side by side). `wait()` before
    `open_shard`; a shard that fails there is indexed again, and reported, by `open_shard`."""

    MIN_SHARDS = 16  # fewer are indexed in this process, when opened
    CHUNK = 8  # shards per task

    def __init__(self, paths: list[str], cache_dir: str | None, workers: int):
        self._pool, self._tasks = None, []
        todo = [p for p in paths if not is_remote(p) and _needs_index(p, cache_dir)]
        # fork is safe only with no other thread running; the children only list tars and write files
        if workers < 2 or len(todo) < self.MIN_SHARDS or threading.active_count() > 1:
            return
        # The children never collect garbage: a cycle holding a DALI pipeline copied from an earlier run in
        # this process must not be destroyed there.
        self._pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("fork"),
                                         initializer=gc.disable)
        log.info("indexing %d shard(s) in %d processes", len(todo), min(workers, len(todo)))
        for start in range(0, len(todo), self.CHUNK):
            self._tasks.append(self._pool.submit(_index_all, todo[start : start + self.CHUNK], cache_dir))

    def wait(self) -> None:
        if self._pool is None:
            return
        for task in self._tasks:
            try:
                task.result()
            except Exception as e:  # noqa: BLE001 (a broken pool: open_shard indexes what is left)
                log.debug("background indexing: %s", e)
        self._pool.shutdown()
        self._pool = None


def _needs_index(path: str, cache_dir: str | None) -> bool:
    return os.path.isfile(path) and not _index_fresh(path, index_path_for(path, cache_dir))


def _index_fresh(path: str, idx: str) -> bool:
    """A local shard's index file exists and is not older than the shard."""
    try:
        return os.path.getmtime(idx) >= os.path.getmtime(path)
    except OSError:
        return False


def _index_all(paths: list[str], cache_dir: str | None) -> None:
    for path in paths:
        try:
            create_index(path, index_path_for(path, cache_dir))
        except Exception:  # noqa: BLE001 (open_shard tries again and reports why)
            pass


def open_shard(path: str, cache_dir: str | None = None) -> Shard:
    """Index a shard (reusing a fresh index file) and count its samples; failures are recorded, not raised."""
    if is_remote(path):
        return _open_remote_shard(path, cache_dir)
    name = shard_name(path)
    if not os.path.isfile(path):
        return Shard(path, name, error="no such file")
    if not os.access(path, os.R_OK):
        return Shard(path, name, error="not readable")
    idx = index_path_for(path, cache_dir)
    return _indexed(path, name, idx, stale=not _index_fresh(path, idx))


def _open_remote_shard(path: str, cache_dir: str | None) -> Shard:
    name = shard_name(path)
    size, version = None, ""
    if is_url(path) and not path.startswith(("http://", "https://")):
        try:
            size, version = object_version(path)
        except FileNotFoundError:
            return Shard(path, name, error="no such object")
        except Exception as e:  # credentials, endpoint, permissions: the store's own words
            return Shard(path, name, error=f"cannot read: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
    idx = index_path_for(path, cache_dir, f"{size}|{version}")
    # A `pipe:` or http(s) shard cannot say whether it changed: it is indexed on every run.
    return _indexed(path, name, idx, stale=not version or not os.path.exists(idx), size=size)


def _indexed(path: str, name: str, idx: str, stale: bool, size: int | None = None) -> Shard:
    """The Shard from its index (created first when `stale`), checked against the tar's end; a remote
    object's `size` stands in for reading its end marker."""
    try:
        if stale:
            create_index(path, idx)
        index = read_index(idx)
        if path.endswith(PLAIN_TAR) and not is_remote(path):
            check_not_truncated(path, index.end)
        elif path.endswith(PLAIN_TAR) and size is not None:
            check_remote_size(index.end, size)
    except tarfile.TarError as e:
        return Shard(path, name, index_path=idx, error=f"cannot index: truncated or damaged tar ({e})")
    except (OSError, ValueError) as e:
        return Shard(path, name, index_path=idx, error=f"cannot index: {e}")
    extensions = frozenset(ext for exts in index.extensions for ext in exts)
    return Shard(path, name, index_path=idx, count=len(index.keys), extensions=extensions)


class _IndexCreator(IndexCreator):
    """wds2idx's index writer, listing the tar in-process instead of with two GNU tar processes: those cost
    milliseconds per shard whatever its size, and GNU tar reports the block of a GNU long-name record
    rather than of the member's own header, so data offsets come out wrong for paths over 100 bytes."""

    def _get_data_tar(self):
        if is_remote(self.uri):
            with open_input(self.uri) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
                yield from _members(archive)
            return
        if self.uri.endswith(PLAIN_TAR):
            listed = _list_plain_tar(self.uri)
            if listed is not None:
                yield from listed
                return
        with tarfile.open(self.uri, "r:" if self.uri.endswith(PLAIN_TAR) else "r:*") as archive:
            yield from _members(archive)

    _get_data_tarfile = _get_data_tar  # what wds2idx calls instead where GNU tar is not installed


def _members(archive: tarfile.TarFile):
    for member in archive:
        if member.isreg():
            yield member.offset_data, member.name, member.size


def _list_plain_tar(path: str) -> list[tuple[int, str, int]] | None:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return _list_ustar(f.read() if size <= WHOLE_READ_BYTES else _HeaderReads(f.fileno(), size))


WHOLE_READ_BYTES = 1 << 20  # smaller tars are read at once; larger ones header by header


class _HeaderReads:
    """`bytes`-like slices of an open file, each one `pread`: the headers of a large tar without reading
    the data between them (a memory map would crash the process if the file shrank meanwhile)."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, span: slice) -> bytes:
        return os.pread(self.fd, span.stop - span.start, span.start)


_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders: tarfile skips no data after them
_ZERO_BLOCK = bytes(512)
_OTHER_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode … devminor


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _list_ustar(data) -> list[tuple[int, str, int]] | None:
    """(data offset, name, size) of each regular file in `data` (bytes or `_HeaderReads`), exactly as
    tarfile lists them, for the plain ustar headers shards are written with; None for anything else (pax
    or GNU long-name records, numbers in base 256, a bad checksum, no end marker), which tarfile then
    lists. tarfile spends ~50 µs of Python per member, most of a small shard's fixed cost."""
    members, pos, end = [], 0, len(data)
    while True:
        header = data[pos:pos + 512]
        if len(header) < 512:
            return None  # no end marker: tarfile decides
        if header == _ZERO_BLOCK:
            return members
        kind = header[156:157]
        if (kind not in _REGULAR and kind not in _NO_DATA) or header[124] & 0x80 or header[148] & 0x80:
            return None
        try:
            size, checksum = _octal(header[124:136]), _octal(header[148:156])
            for start, stop in _OTHER_NUMBERS:  # tarfile rejects a header with any of them unreadable
                if header[start] not in (0x80, 0xFF):
                    _octal(header[start:stop])
        except ValueError:
            return None
        if checksum != sum(header) - sum(header[148:156]) + 256:  # the field counts as eight spaces
            return None
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if kind in _NO_DATA or (kind == b"\0" and name.endswith("/")):  # an old-style folder
            pos += 512
            continue
        if pos + 512 + size > end:
            return None
        members.append((pos + 512, name, size))
        pos += 512 + (size + 511) // 512 * 512


def create_index(path: str, idx: str) -> None:
    os.makedirs(os.path.dirname(idx), exist_ok=True)
    tmp = f"{idx}.tmp-{os.getpid()}"
    try:
        with _IndexCreator(path, tmp, verbose=False) as creator:
            creator.create_index()
        os.replace(tmp, idx)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.debug("indexed shard=%s index=%s", path, idx)


def read_index(idx: str, spans: bool = False) -> ShardIndex:
    """The index file's samples; with `spans`, where each component's data lies in the tar too."""
    keys: list[str] = []
    extensions: list[list[str]] = []
    where: list[list[tuple[int, int]]] = []
    fields: list[str] = []
    with open(idx) as f:
        header = f.readline().split()
        if len(header) != 2 or not header[0].startswith("v1."):
            raise ValueError(f"{idx} is not a wds2idx index file")
        for line in f:
            fields = line.split()
            if not fields or len(fields) % 4:
                raise ValueError(f"malformed line in {idx}: {line.strip()[:80]}")
            name = fields[3]  # the key is the name up to the first dot after the last slash
            keys.append(name[: name.find(".", name.rfind("/") + 1)])
            extensions.append(fields[0::4])
            if spans:
                where.append([(int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)])
    if len(keys) != int(header[1]):
        raise ValueError(f"{idx} lists {len(keys)} samples, its header says {header[1]}")
    # Samples are listed in tar order, so the last one's components end last.
    end = max((int(fields[i + 1]) + int(fields[i + 2]) for i in range(0, len(fields), 4)), default=0)
    return ShardIndex(keys, extensions, end, where if spans else None)


def check_remote_size(end: int, size: int) -> None:
    """A remote tar holds all its indexed data (its end marker is not fetched: that would cost a request)."""
    if end > size:
        raise ValueError(f"truncated tar: data runs to byte {end}, the object has {size}")


def check_not_truncated(path: str, end: int) -> None:
    """A complete tar holds all its indexed data and ends with the two zero blocks of its end marker."""
    size = os.path.getsize(path)
    if end > size:
        raise ValueError(f"truncated tar: data runs to byte {end}, file has {size}")
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        if size < end + 1024 or f.read(1024).strip(b"\0"):
            raise ValueError("truncated tar: no end-of-archive marker")
