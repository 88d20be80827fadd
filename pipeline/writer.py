"""Per-shard Parquet files: buffer a shard's rows until all of them are in, then write the file
atomically (temporary name, fsync, rename). A reader, or a rerun, never sees half a shard.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.batch import OK, Predictions, Row

log = logging.getLogger(__name__)

META_KEY = b"shardscore"
TMP_MARK = ".tmp-"


@dataclass
class _ShardBuffer:
    expected: int
    rows: list[Row] = field(default_factory=list)
    topk_index: list[np.ndarray] = field(default_factory=list)
    topk_prob: list[np.ndarray] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)


class ShardWriter:
    """Knows each shard's expected sample count; commits `<dir>/<shard>.parquet` when it is reached.

    `metadata` (model, weights, precision, batch size, version, config) goes into every file's schema;
    `match_keys` are the metadata entries a resumed run must agree with for a file to count as done.
    """

    def __init__(self, out_dir: str, expected: dict[str, int], metadata: dict, topk: int,
                 categories: list[str] | None, num_classes: int | None, match_keys: tuple[str, ...] = ()):
        self.out_dir = out_dir
        self.metadata = metadata
        self.match_keys = match_keys
        self.categories = categories
        self.schema = self._schema(topk, categories, num_classes)
        self._buffers = {name: _ShardBuffer(count) for name, count in expected.items()}
        self.failed: dict[str, str] = {}
        self.committed: list[str] = []
        self.rows_written = 0
        self.status_counts: dict[str, int] = {}
        os.makedirs(out_dir, exist_ok=True)

    def path(self, shard: str) -> str:
        return os.path.join(self.out_dir, f"{shard}.parquet")

    def completeness(self, shard: str) -> tuple[bool, str]:
        """(done, why not): the file exists, its footer reads, its rows and metadata match this run."""
        path = self.path(shard)
        if not os.path.exists(path):
            return False, "no output yet"
        try:
            meta = pq.read_metadata(path)
        except Exception as e:
            return False, f"unreadable parquet ({type(e).__name__})"
        expected = self._buffers[shard].expected
        if meta.num_rows != expected:
            return False, f"{meta.num_rows} rows, shard has {expected}"
        stored = json.loads((meta.metadata or {}).get(META_KEY, b"{}"))
        for key in self.match_keys:
            if stored.get(key) != self.metadata.get(key):
                return False, f"{key} was {stored.get(key)!r}, now {self.metadata.get(key)!r}"
        return True, ""

    def remove_stale_temporaries(self, shards: list[str]) -> None:
        """Temporary files a killed run left for these shards (never another rank's)."""
        prefixes = tuple(f".{s}.parquet{TMP_MARK}" for s in shards)
        for name in os.listdir(self.out_dir):
            if name.startswith(prefixes):
                os.remove(os.path.join(self.out_dir, name))
                log.info("removed leftover temporary file=%s", name)

    def add(self, rows: list[Row], predictions: Predictions) -> None:
        index = predictions.topk_index.numpy()
        prob = predictions.topk_prob.numpy()
        logits = predictions.logits.numpy() if predictions.logits is not None else None
        for i, row in enumerate(rows):
            buf = self._buffers.get(row.shard)
            if buf is None or row.shard in self.failed:
                continue
            buf.rows.append(row)
            buf.topk_index.append(index[i])
            buf.topk_prob.append(prob[i])
            if logits is not None:
                buf.logits.append(logits[i])
            if len(buf.rows) == buf.expected:
                self._commit(row.shard)
            elif len(buf.rows) > buf.expected:
                raise RuntimeError(f"shard {row.shard} produced more rows than its index lists ({buf.expected})")

    def fail(self, shard: str, reason: str) -> None:
        """Drop what was buffered: a shard that could not be read to its end gets no file."""
        self.failed[shard] = reason
        if shard in self._buffers:
            self._buffers[shard] = _ShardBuffer(self._buffers[shard].expected)

    def incomplete(self) -> list[str]:
        return [s for s, b in self._buffers.items() if s not in self.failed and s not in self.committed]

    def _commit(self, shard: str) -> None:
        buf = self._buffers[shard]
        table = self._table(buf)
        final = self.path(shard)
        tmp = os.path.join(self.out_dir, f".{shard}.parquet{TMP_MARK}{os.getpid()}")
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.out_dir)
        self._buffers[shard] = _ShardBuffer(buf.expected)  # free the rows
        self.committed.append(shard)
        self.rows_written += table.num_rows
        for status in table.column("status").to_pylist():
            self.status_counts[status] = self.status_counts.get(status, 0) + 1
        log.info("wrote shard=%s rows=%d path=%s", shard, table.num_rows, final)

    def _table(self, buf: _ShardBuffer) -> pa.Table:
        ok = np.array([r.status == OK for r in buf.rows])
        columns = {
            "key": [r.key for r in buf.rows],
            "shard": [r.shard for r in buf.rows],
            "label": [r.label for r in buf.rows],
            "topk_index": _lists(buf.topk_index, ok),
            "topk_prob": _lists(buf.topk_prob, ok),
        }
        if self.categories is not None:
            names = np.array(self.categories, dtype=object)
            columns["topk_label"] = [list(names[i]) if good else None for i, good in zip(buf.topk_index, ok)]
        columns["status"] = [r.status for r in buf.rows]
        columns["error"] = [r.error for r in buf.rows]
        if "logits" in self.schema.names:
            columns["logits"] = _lists(buf.logits, ok)
        return pa.table(columns, schema=self.schema)

    def _schema(self, topk: int, categories: list[str] | None, num_classes: int | None) -> pa.Schema:
        fields = [
            pa.field("key", pa.string(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),
            pa.field("label", pa.int64()),
            pa.field("topk_index", pa.list_(pa.int32())),
            pa.field("topk_prob", pa.list_(pa.float32())),
        ]
        if categories is not None:
            fields.append(pa.field("topk_label", pa.list_(pa.string())))
        fields += [pa.field("status", pa.string(), nullable=False), pa.field("error", pa.string())]
        if num_classes is not None:
            fields.append(pa.field("logits", pa.list_(pa.float16(), num_classes)))
        return pa.schema(fields, metadata={META_KEY: json.dumps(self.metadata, default=str).encode()})


def _lists(arrays: list[np.ndarray], ok: np.ndarray) -> list:
    """Rows that are not ok get null predictions: their placeholder image was never a real input."""
    return [a if good else None for a, good in zip(arrays, ok)]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_run_metadata(path: str) -> dict:
    """The shardscore metadata stored in a Parquet file's schema."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(META_KEY, b"{}"))
