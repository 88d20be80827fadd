"""Shards: expand the user's patterns (local paths, or URLs: s3:// and any fsspec scheme, webdataset's
`pipe:` and https://), make sure each has an index file (`pipeline.shard_index`), count its samples, and
pick this rank's share.

The index file is the single source of truth for which samples a shard
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

from pipeline.errors import UserError
from pipeline.layout import filesystem, is_remote, is_url, object_version, open_input
from pipeline.shard_index import PLAIN_TAR, check_not_truncated, check_remote_size, create_index, read_index

log = logging.getLogger(__name__)

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
            fs.invalidate_cache(inner)  # this process may have listed it before (a sweep, a rerun)
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


class BackgroundOpening:
    """Local shards opened (indexed where needed, counted, checked) by forked processes while this one
    loads the model: listing a tar holds Python's GIL, so threads would not run side by side, and the
    children hand back the opened Shards so that nothing is read twice. `wait()` → {path: Shard}; a path
    missing there (too few shards to fork for, a broken pool) is opened by `open_shard`."""

    MIN_SHARDS = 16  # fewer are opened in this process
    CHUNK = 8  # shards per task

    def __init__(self, paths: list[str], cache_dir: str | None, workers: int):
        self._pool, self._tasks = None, []
        local = [p for p in paths if not is_remote(p)]
        # fork is safe only with no other thread running; the children only list tars and write files
        if workers < 2 or len(local) < self.MIN_SHARDS or threading.active_count() > 1:
            return
        # The children never collect garbage: a cycle holding a DALI pipeline copied from an earlier run in
        # this process must not be destroyed there.
        self._pool = ProcessPoolExecutor(min(workers, len(local)), mp_context=multiprocessing.get_context("fork"),
                                         initializer=gc.disable)
        log.info("opening %d shard(s) in %d processes", len(local), min(workers, len(local)))
        for start in range(0, len(local), self.CHUNK):
            self._tasks.append(self._pool.submit(_open_all, local[start : start + self.CHUNK], cache_dir))

    def wait(self) -> dict[str, Shard]:
        opened: dict[str, Shard] = {}
        if self._pool is None:
            return opened
        for task in self._tasks:
            try:
                opened.update(task.result())
            except Exception as e:  # noqa: BLE001 (a broken pool: open_shard opens what is left)
                log.debug("background opening: %s", e)
        self._pool.shutdown()
        self._pool = None
        return opened


def _index_fresh(path: str, idx: str) -> bool:
    """A local shard's index file exists and is not older than the shard."""
    try:
        return os.path.getmtime(idx) >= os.path.getmtime(path)
    except OSError:
        return False


def _open_all(paths: list[str], cache_dir: str | None) -> dict[str, Shard]:
    return {path: open_shard(path, cache_dir) for path in paths}


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


def index_for(path: str, cache_dir: str | None = None) -> tuple[str | None, str]:
    """(a shard's index file, "") or (None, why there is none): a fresh local index as it is, without
    reading it through; anything else as `open_shard` opens it (indexing it first)."""
    if not is_remote(path) and path.endswith(PLAIN_TAR):
        idx = index_path_for(path, cache_dir)
        try:
            if _index_fresh(path, idx):
                with open(idx, "rb") as f:
                    if f.read(4).startswith(b"v1."):
                        return idx, ""
        except OSError:
            pass
    shard = open_shard(path, cache_dir)
    return (None, shard.error) if shard.error else (shard.index_path, "")


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
