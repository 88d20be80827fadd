"""Shards: expand the user's patterns, make sure each has a DALI index file, count its samples,
and pick this rank's share.

The index file (DALI's `wds2idx` format) is the single source of truth for which samples a shard
holds: both decoders produce exactly one row per index entry, and the writer expects that count.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import tarfile
from dataclasses import dataclass

import braceexpand
from wds2idx import IndexCreator

from pipeline.errors import UserError

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


@dataclass(frozen=True)
class ShardIndex:
    """A shard's samples in tar order: each one's key and component extensions, and where its data ends."""

    keys: list[str]
    extensions: list[list[str]]
    end: int  # the byte after the last component's data
    spans: list[list[tuple[int, int]]] | None = None  # (offset, size) of each component, when asked for


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns, globs, single paths, lists of those, or a .txt file of paths → sorted paths."""
    items = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for item in items:
        item = os.path.expanduser(str(item))
        if item.endswith(".txt") and os.path.isfile(item):
            with open(item) as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
            paths.extend(expand_shards(lines) if lines else [])
            continue
        for pattern in braceexpand.braceexpand(item):
            if glob.has_magic(pattern):
                paths.extend(glob.glob(pattern))
            else:
                paths.append(pattern)  # kept even when missing: it becomes a failed shard, not a lost one
    paths = sorted(set(os.path.abspath(p) for p in paths))
    existing = [p for p in paths if os.path.exists(p)]
    if not existing:
        raise UserError(f"data.shards={spec!r} matches no file")
    names: dict[str, str] = {}
    for p in paths:
        name = shard_name(p)
        if name in names:
            raise UserError(f"two shards share the name {name!r} ({names[name]} and {p}); outputs would collide")
        names[name] = p
    return paths


def shard_name(path: str) -> str:
    base = os.path.basename(path)
    for ext in COMPRESSED_TAR + PLAIN_TAR:
        if base.endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]


def assign_to_rank(paths: list[str], rank: int, world_size: int) -> list[str]:
    """Round-robin over the sorted list: deterministic and disjoint, so any rank can be rerun alone."""
    return sorted(paths)[rank::world_size]


def index_path_for(path: str, cache_dir: str | None) -> str:
    """`<shard>.idx` beside the shard when that folder is writable, else in the cache folder."""
    beside = os.path.join(os.path.dirname(path), shard_name(path) + ".idx")
    if os.path.exists(beside) or os.access(os.path.dirname(path), os.W_OK):
        return beside
    if cache_dir is None:
        cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "shardscore", "index")
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{shard_name(path)}-{digest}.idx")


def open_shard(path: str, cache_dir: str | None = None) -> Shard:
    """Index a shard (reusing a fresh index file) and count its samples; failures are recorded, not raised."""
    name = shard_name(path)
    if not os.path.isfile(path):
        return Shard(path, name, error="no such file")
    if not os.access(path, os.R_OK):
        return Shard(path, name, error="not readable")
    idx = index_path_for(path, cache_dir)
    try:
        if not (os.path.exists(idx) and os.path.getmtime(idx) >= os.path.getmtime(path)):
            create_index(path, idx)
        index = read_index(idx)
        if path.endswith(PLAIN_TAR):
            check_not_truncated(path, index.end)
    except tarfile.TarError as e:
        return Shard(path, name, index_path=idx, error=f"cannot index: truncated or damaged tar ({e})")
    except (OSError, ValueError) as e:
        return Shard(path, name, index_path=idx, error=f"cannot index: {e}")
    extensions = frozenset(ext for exts in index.extensions for ext in exts)
    return Shard(path, name, index_path=idx, count=len(index.keys), extensions=extensions)


# Below this size, listing the tar in-process beats starting GNU tar twice (wds2idx's way), which
# costs a few milliseconds per shard whatever its size.
SMALL_TAR_BYTES = 1 << 20


class _IndexCreator(IndexCreator):
    """wds2idx's index writer, listing small archives with tarfile instead of two GNU tar processes."""

    def _get_data_tar(self):
        if os.path.getsize(self.uri) > SMALL_TAR_BYTES:
            yield from super()._get_data_tar()
            return
        with tarfile.open(self.uri, "r:" if self.uri.endswith(PLAIN_TAR) else "r:*") as archive:
            for member in archive:
                if member.isreg():
                    yield member.offset_data, member.name, member.size


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


def check_not_truncated(path: str, end: int) -> None:
    """A complete tar holds all its indexed data and ends with the two zero blocks of its end marker."""
    size = os.path.getsize(path)
    if end > size:
        raise ValueError(f"truncated tar: data runs to byte {end}, file has {size}")
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        if size < end + 1024 or f.read(1024).strip(b"\0"):
            raise ValueError("truncated tar: no end-of-archive marker")
