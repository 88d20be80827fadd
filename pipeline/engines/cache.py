"""The engine cache: one file per engine under a key of everything that makes it valid, built once per
node under a file lock, written atomically.

Ranks that share a node (and a cache folder) race for the lock: the first builds, the others wait and load
what it wrote. An engine is never half-written where a reader looks for it: it is built to a temporary name
beside its place and renamed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    """$SHARDSCORE_ENGINE_CACHE, else ~/.cache/shardscore/engines (XDG_CACHE_HOME honoured)."""
    if os.environ.get("SHARDSCORE_ENGINE_CACHE"):
        return os.environ["SHARDSCORE_ENGINE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "shardscore", "engines")


def engine_key(parts: dict) -> str:
    """A short stable name for `parts` (plain JSON values): the same parts, the same engine."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def module_digest(module: torch.nn.Module) -> str:
    """What the module computes, as far as its weights and its structure say: a digest of every parameter's
    and buffer's bytes and of its printed form (random-init weights, checkpoints and pretrained tags alike)."""
    h = hashlib.sha256(repr(module).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:24]


@dataclass
class Cached:
    path: str
    hit: bool  # loaded what was there (built by an earlier run, or by another rank while this one waited)
    seconds: float  # building it, or waiting for the lock and finding it


def cached_file(cache_dir: str, name: str, build: Callable[[str], None], parts: dict | None = None) -> Cached:
    """`cache_dir/name`, built by `build(temporary_path)` unless it is there; one builder at a time per file.
    `parts` (the key's contents) are written beside it, for people wondering what an engine is."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, name)
    start = time.perf_counter()
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.exists(path):
            return Cached(path, True, time.perf_counter() - start)
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            build(temporary)
            if parts is not None:
                with open(path + ".json", "w") as f:
                    json.dump(parts, f, indent=1, sort_keys=True, default=str)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    return Cached(path, False, time.perf_counter() - start)
