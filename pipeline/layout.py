"""Where the job's files live: a local or cluster file system, or object storage (s3:// and any other
fsspec URL). The output folder's layout and its atomic writes, and opening inputs by URL.

Locally a file is written under a temporary name, fsynced and renamed; in object storage it is one
whole-object PUT. Either way a reader never sees half a file. Endpoints and credentials come from the
standard environment and config files (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID …, ~/.aws/).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError

TMP_MARK = ".tmp-"

# --- the names in an output folder: built here only ---------------------------------------------------
# Shard files are `<shard>.parquet`; every other name starts with `_`, which Parquet readers skip.
SHARD_SUFFIX = ".parquet"
METRICS_DIR = "_metrics"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
REPORT_DIR = "_report"
REPORT_PAGE = f"{REPORT_DIR}/index.html"
LOGS_DIR = "_logs"


def shard_file(shard: str) -> str:
    return f"{shard}{SHARD_SUFFIX}"


def shard_of(name: str) -> str | None:
    """The shard a name in the output folder is the file of; None for the `_` extras and temporaries."""
    if not name.endswith(SHARD_SUFFIX) or name.startswith(("_", ".")) or "/" in name:
        return None
    return name[: -len(SHARD_SUFFIX)]


def metrics_file(rank: int) -> str:
    """A rank's metrics, refreshed while it runs."""
    return f"{METRICS_DIR}/rank-{rank:05d}.json"


def record_file(rank: int) -> str:
    """A rank's completion record, written at its end."""
    return f"{METRICS_DIR}/done-{rank:05d}.json"


def verify_record_file(rank: int) -> str:
    """What a rank of `jobs.verify` found in its share of the shards."""
    return f"{METRICS_DIR}/verify-{rank:05d}.json"


def is_url(path: str) -> bool:
    return "://" in path


def is_remote(path: str) -> bool:
    """Not a local path: a URL (s3://, https://, …) or a webdataset `pipe:` command."""
    return is_url(path) or path.startswith("pipe:")


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL."""
    import fsspec

    try:
        if url.startswith(("s3://", "s3a://")):
            return fsspec.core.url_to_fs(url, session=_s3_session())
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # the scheme's package is missing, e.g. s3fs for s3://
        raise UserError(f"{url.split('://')[0]}:// needs a package that is not installed ({e}); for s3:// "
                        "pip install 'shardscore[s3]'") from None


_S3_SESSION = None


def _s3_session():
    """One botocore session per process tree: a client's first use parses S3's service description
    (~0.3 s of JSON), and DataLoader workers, forked after the planning step used it, inherit it parsed."""
    global _S3_SESSION
    if _S3_SESSION is None:
        from aiobotocore.session import AioSession

        _S3_SESSION = AioSession()
    return _S3_SESSION


def open_input(path: str):
    """A binary stream over a shard: local files directly, `pipe:` commands and http(s) through
    webdataset (which already opens them), other URLs through fsspec."""
    if not is_remote(path):
        return open(path, "rb")
    if path.startswith(("pipe:", "http://", "https://")):
        from webdataset.gopen import gopen

        return gopen(path, "rb")
    fs, inner = filesystem(path)
    return fs.open(inner, "rb")


def object_version(url: str) -> tuple[int, str]:
    """(size, ETag or modification time) of a remote object: what changes when it is replaced."""
    fs, inner = filesystem(url)
    fs.invalidate_cache(inner)  # fsspec caches listings per filesystem instance: a replaced object must show
    info = fs.info(inner)
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return int(info.get("size") or 0), str(version).strip('"')


def _temporary(path: str) -> str:
    """The name a file is written under before it is renamed into place: hidden, and this process's own."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}")


class OutputLayout:
    """A folder of the job's files, local or in object storage: every read and write of an output folder
    (and of `jobs.select`'s new shards) goes through here, and every write of a whole file is atomic."""

    def __init__(self, root: str, create: bool = True):
        """`create`: make a local folder that does not exist yet (a reading job does not)."""
        self.root = root.rstrip("/") or root
        self.remote = is_url(root)
        if self.remote:
            self.fs, self.base = filesystem(self.root)
        elif create:
            os.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.remote else os.path.join(self.root, name)

    def _inner(self, name: str) -> str:
        return posixpath.join(self.base, name)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._inner(name)) if self.remote else os.path.exists(self.path(name))

    def listdir(self, folder: str = "") -> list[str]:
        """Names in the output folder (or one of its sub-folders); [] when it does not exist."""
        if self.remote:
            try:
                return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self._inner(folder), detail=False,
                                                                                      refresh=True))
            except FileNotFoundError:
                return []
        target = os.path.join(self.root, folder)
        return sorted(os.listdir(target)) if os.path.isdir(target) else []

    def shard_files(self) -> list[str]:
        """The names of the committed shard files, sorted."""
        return [n for n in self.listdir() if shard_of(n) is not None]

    def newest(self, names: list[str]) -> str:
        """The most recently written of `names`."""
        if not self.remote:
            return max(names, key=lambda n: os.path.getmtime(self.path(n)))
        listed = {posixpath.basename(e["name"]): e for e in self.fs.ls(self.base, detail=True, refresh=True)}

        def written(name: str) -> tuple:
            entry = listed.get(name) or {}
            when = entry.get("LastModified") or entry.get("mtime")
            return (when.timestamp() if hasattr(when, "timestamp") else float(when or 0), name)

        return max(names, key=written)

    def open_read(self, name: str):
        return self.fs.open(self._inner(name), "rb") if self.remote else open(self.path(name), "rb")

    def arrow_source(self, name: str) -> tuple[str, object]:
        """(path, filesystem) for pyarrow's readers: the local path and None, or the object and fsspec's."""
        return (self._inner(name), self.fs) if self.remote else (self.path(name), None)

    def read_rank_files(self, name_for) -> list[dict]:
        """Every rank's file of one kind (`name_for`: `metrics_file`, `record_file` …), read; a file being
        replaced right now, or damaged, is left out (that rank is not counted)."""
        folder, pattern = name_for(0).rsplit("/", 1)
        prefix, suffix = pattern.split("0" * 5)
        found = []
        for name in self.listdir(folder):
            if name.startswith(prefix) and name.endswith(suffix):
                try:
                    found.append(self.read_json(f"{folder}/{name}"))
                except (OSError, ValueError):
                    continue
        return found

    def read_json(self, name: str) -> dict:
        if self.remote:
            return json.loads(self.fs.cat_file(self._inner(name)))
        with open(self.path(name)) as f:
            return json.load(f)

    def write_json(self, name: str, content: dict) -> str:
        return self.write_bytes(name, json.dumps(content, indent=2, sort_keys=True, default=str).encode(), sync=False)

    def write_bytes(self, name: str, data: bytes | pa.Buffer, sync: bool = True) -> str:
        """Atomically: a reader sees the old content or the new, never part of it."""
        if self.remote:
            self.fs.pipe_file(self._inner(name), data.to_pybytes() if isinstance(data, pa.Buffer) else data)
            return self.path(name)
        path = self.path(name)
        if os.path.dirname(path) != self.root:  # the root was made on opening: no syscalls per shard for it
            os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _temporary(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if sync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    @contextlib.contextmanager
    def open_atomic(self, name: str, buffering: int = -1, sync: bool = True):
        """A binary file to stream a large file into: it appears whole when the block ends without an
        error, and not at all otherwise (locally a temporary file renamed into place, synced first unless
        `sync` is false; then `make_durable` before relying on it; in S3 a multipart upload, completed on
        close and aborted on an error; other fsspec stores may keep what was written before an error)."""
        if self.remote:
            f = self.fs.open(self._inner(name), "wb")
            try:
                yield f
            except BaseException:
                f.discard()
                raise
            f.close()
            return
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _temporary(path)
        try:
            with open(tmp, "wb", buffering=buffering) as f:
                yield f
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def make_durable(self, name: str) -> None:
        """A local file written without syncing is on disk when this returns (object storage: already)."""
        if self.remote:
            return
        fd = os.open(self.path(name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_new(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist yet; False if it did. Locally exclusive (a hard link of a
        complete temporary file, so of two ranks exactly one wins); in object storage a check, then a PUT."""
        if self.remote:
            if self.exists(name):
                return False
            self.write_bytes(name, data, sync=False)
            return True
        path = self.path(name)
        tmp = _temporary(path)
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def write_parquet(self, name: str, table: pa.Table, **options) -> str:
        # Encoded in memory, then written as one file: pyarrow's own file output resolves a filesystem
        # for every path, a fixed cost that shows with many small shards.
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, **options)
        return self.write_bytes(name, buffer.getvalue())

    def read_footer(self, name: str) -> tuple[pq.FileMetaData | None, str]:
        """(footer, "") or (None, why not)."""
        path, fs = self.arrow_source(name)
        try:
            return pq.read_metadata(path, filesystem=fs), ""
        except FileNotFoundError:
            return None, "no output yet"
        except Exception as e:
            return None, f"unreadable parquet ({type(e).__name__})"

    def read_table(self, name: str, columns: list[str]) -> pa.Table:
        path, fs = self.arrow_source(name)
        return pq.read_table(path, columns=columns, filesystem=fs)

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self._inner(name)) if self.remote else os.remove(self.path(name))
        except FileNotFoundError:
            pass

    def sync(self) -> None:
        """Make this run's renames durable (local folders; object storage has no renames)."""
        if self.remote:
            return
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_stale_temporaries(self, prefixes: tuple[str, ...]) -> list[str]:
        """Temporary files a killed run left (local only: object storage writes whole objects)."""
        if self.remote:
            return []
        stale = [n for n in os.listdir(self.root) if n.startswith(prefixes) and TMP_MARK in n]
        for name in stale:
            os.remove(os.path.join(self.root, name))
        return stale


def local_logs_dir(output_dir: str) -> str:
    """Where Hydra's run logs go: `<output.dir>/_logs` on a file system; for an object-storage output,
    a local folder (`./outputs/logs/<bucket>/<prefix>`), as Hydra writes its logs with plain files."""
    if not is_url(output_dir):
        return f"{output_dir.rstrip('/')}/{LOGS_DIR}"
    return os.path.join(os.getcwd(), "outputs", "logs", output_dir.split("://", 1)[1].strip("/"))


class _NoPandas:
    """An import finder that refuses pandas, for `arrow_without_pandas`."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is not imported for pyarrow's first array")


def arrow_without_pandas() -> None:
    """pyarrow imports pandas (~0.5 s here) the first time it builds an array, only to ask whether its
    input is a pandas object; a job never passes one. Let that first question find no pandas: pyarrow
    then stops asking, and still imports pandas when something converts to pandas later."""
    if "pandas" in sys.modules:
        return
    sys.meta_path.insert(0, _NoPandas)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(_NoPandas)
