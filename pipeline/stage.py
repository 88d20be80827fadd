"""Remote shards staged on node-local disk a few shards ahead of the decoder (`data.stage_dir`), so DALI
reads object storage as local files: one whole-object download per shard, in parallel ranged GETs, instead
of a request per sample component.

At most `ahead` shards are on disk or being fetched at a time, and each staged file is removed once the
decoder is done with it, so the disk used is bounded by a few shards whatever the rank's size. Each
process stages into a folder of its own (named by host and process id, so a stage_dir shared by nodes
works); the folders a killed process of this host left behind are removed at start.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from pipeline.errors import UserError
from pipeline.layout import filesystem, is_url
from pipeline.shards import Shard

log = logging.getLogger(__name__)

PART_BYTES = 8 * 2**20  # one ranged GET
PARTS_IN_FLIGHT = 4  # ranged GETs at once per shard: at most 32 MiB of it in memory, × stage_ahead per process


def can_stage(shard: Shard) -> bool:
    """Objects fsspec can read by range: s3:// and other URLs, not webdataset's `pipe:` commands."""
    return is_url(shard.path) and shard.is_plain_tar


class StageError(OSError):
    pass


class Stager:
    """`local(shard)` waits for a shard's staged copy and returns its path; `release(shard)` removes it and
    starts the next one. Shards are staged in the order given, `ahead` at most at a time."""

    def __init__(self, shards: list[Shard], stage_dir: str, ahead: int):
        remove_abandoned(stage_dir)
        self.dir = os.path.join(stage_dir, f"{_folder_prefix()}{os.getpid()}")
        os.makedirs(self.dir, exist_ok=True)
        self._queue = [s for s in shards if can_stage(s)]
        self._pool = ThreadPoolExecutor(max_workers=max(1, ahead), thread_name_prefix="shardscore-stage")
        self._staged: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.ahead = max(1, ahead)
        self._next = 0
        self.bytes_staged = 0
        self.shards_staged = 0
        self.on_disk = 0
        self.peak_on_disk = 0  # shards staged and not yet released, at most
        self._fill()
        log.info("staging %d remote shard(s) in %s, %d ahead", len(self._queue), self.dir, self.ahead)

    def local(self, shard: Shard) -> str:
        """The local copy of `shard` (staged now if it was not queued); raises StageError if it cannot be fetched."""
        with self._lock:
            if shard.name not in self._staged:
                self._staged[shard.name] = self._pool.submit(self._fetch, shard)
            future = self._staged[shard.name]
        return future.result()

    def release(self, shard: Shard) -> None:
        with self._lock:
            future = self._staged.pop(shard.name, None)
        if future is not None:
            future.add_done_callback(lambda f: self._removed(shard, f))
        self._fill()

    def stats(self) -> dict:
        return {"shards": self.shards_staged, "bytes": self.bytes_staged, "peak_shards_on_disk": self.peak_on_disk}

    def _removed(self, shard: Shard, future: Future) -> None:
        _remove(self._path(shard))
        if future.exception() is None:
            with self._lock:
                self.on_disk -= 1

    def close(self) -> None:
        self._next = len(self._queue)
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _fill(self) -> None:
        with self._lock:
            while self._next < len(self._queue) and len(self._staged) < self.ahead:
                shard = self._queue[self._next]
                self._next += 1
                if shard.name not in self._staged:
                    self._staged[shard.name] = self._pool.submit(self._fetch, shard)

    def _path(self, shard: Shard) -> str:
        return os.path.join(self.dir, f"{shard.name}.tar")

    def _fetch(self, shard: Shard) -> str:
        path = self._path(shard)
        tmp = f"{path}.part"
        try:
            fs, inner = filesystem(shard.path)
            size = int(fs.info(inner)["size"])
            ranges = [(start, min(start + PART_BYTES, size)) for start in range(0, size, PART_BYTES)]
            with open(tmp, "wb") as f:
                f.truncate(size)
                for i in range(0, len(ranges), PARTS_IN_FLIGHT):
                    group = ranges[i:i + PARTS_IN_FLIGHT]
                    starts, stops = [a for a, _ in group], [b for _, b in group]
                    parts = fs.cat_ranges([inner] * len(group), starts, stops, on_error="return")
                    for offset, stop, data in zip(starts, stops, parts):
                        if isinstance(data, BaseException):
                            raise data
                        if len(data) != stop - offset:  # (the file is already `size` long: holes would pass)
                            raise StageError(f"got {len(data)} of the {stop - offset} bytes at offset {offset}")
                        os.pwrite(f.fileno(), data, offset)
            os.replace(tmp, path)
        except Exception as e:
            _remove(tmp)
            raise StageError(f"cannot stage {shard.path}: {type(e).__name__}: {' '.join(str(e).split())[:160]}") from None
        with self._lock:
            self.bytes_staged += size
            self.shards_staged += 1
            self.on_disk += 1
            self.peak_on_disk = max(self.peak_on_disk, self.on_disk)
        log.debug("staged shard=%s bytes=%d", shard.name, size)
        return path


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def check_stage_dir(stage_dir: str) -> None:
    """A stage_dir that cannot be used is the user's to fix: say so before any work."""
    try:
        os.makedirs(stage_dir, exist_ok=True)
        if not os.access(stage_dir, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as e:
        raise UserError(f"data.stage_dir={stage_dir}: cannot stage shards there ({e.strerror or e})") from None


def _folder_prefix() -> str:
    return f"shardscore-{socket.gethostname()}-"


def remove_abandoned(stage_dir: str) -> None:
    """Staging folders of this host's processes that no longer run (killed before they could clean up)."""
    if not os.path.isdir(stage_dir):
        return
    prefix = _folder_prefix()
    for name in os.listdir(stage_dir):
        pid = name.removeprefix(prefix)
        if name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(stage_dir, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
