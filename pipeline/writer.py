"""Per-shard Parquet files: buffer a shard's rows until all of them are in, then write the file
atomically (locally: temporary name, fsync, rename; in object storage: one whole-object PUT). A
reader, or a rerun, never sees half a shard.

Rows arrive as columns per batch; each batch becomes one Arrow table (one call per column), a shard's
file is its slices of those, and a writer thread encodes, syncs and renames it (pyarrow and fsync
release the GIL), so the loop goes on scoring meanwhile. Whether a shard's file is complete is decided
by one rule, `shard_complete`, which resume, the completion records and `jobs.verify` all use.
"""

from __future__ import annotations

import collections
import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.batch import OK, Rows
from pipeline.completeness import META_KEY, kept_and_dropped, run_identity, shard_complete, stored_metadata
from pipeline.layout import OutputLayout, shard_file

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 256 * 2**20  # tables handed to the writer thread and not yet on disk
WRITE_THREADS = 2  # files encoded and synced at once (4 measured no faster at 3,000 shards: the CPUs are the limit)
class CannotMerge(Exception):
    """A shard's existing file does not line up with the rows scored now (other keys or statuses)."""


@dataclass
class _ShardBuffer:
    expected: int
    count: int = 0
    parts: list[pa.Table] = field(default_factory=list)  # slices of batch tables, in row order
    counts: collections.Counter = field(default_factory=collections.Counter)  # rows per status


class ShardWriter:
    """Knows each shard's expected sample count; commits `<dir>/<shard>.parquet` when it is reached.

    `metadata` (model, weights, precision, outputs, batch size, version, config) goes into every file's
    schema with the file's row and status counts; the kept components (string columns) and then the
    output kinds' columns follow key/shard/label/status/error.
    """

    def __init__(self, layout: OutputLayout, expected: dict[str, int], metadata: dict, outputs: list,
                 kept: tuple[str, ...] = ()):
        """`outputs`: every output kind of the run, in column order."""
        self.layout = layout
        self.metadata = metadata
        self.identity = run_identity(metadata)
        self._rows_fields = [
            pa.field("key", pa.string(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),
            pa.field("label", pa.int64()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            *(pa.field(name, pa.string()) for name in kept),
        ]
        self.schema = pa.schema([*self._rows_fields, *(f for kind in outputs for f in kind.fields())])
        self.compute_only(outputs)
        self._merge: set[str] = set()  # shards whose file gives the columns not computed
        self.kept = kept
        # Statistics (min/max, for readers that skip files by key) on the row columns only; floating output
        # columns are stored byte-stream-split, which compresses them and costs less than a dictionary.
        self._parquet_options = {
            "compression": "zstd", "use_dictionary": ["shard", "status"],
            "write_statistics": ["key", "shard", "label", "status"],
            "use_byte_stream_split": [_parquet_path(f) for f in self.schema if _is_floating(f.type)],
        }
        self._buffers = {name: _ShardBuffer(count) for name, count in expected.items()}
        self.failed: dict[str, str] = {}
        self.committed: dict[str, dict] = {}  # shard → {"rows", "status_counts"}, this run's and resumed ones
        self.rows_written = 0
        self.status_counts: collections.Counter = collections.Counter()
        self._thread = ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="shardscore-write")
        self._metadata_json = json.dumps(metadata, default=str)  # the run's part, encoded once
        self._pending: deque = deque()  # (shard, rows, status counts, bytes, future) in submission order
        self._pending_bytes = 0

    def resume(self, shard: str, footer: tuple | None = None) -> tuple[bool, str]:
        """Is the shard's file already complete by the rule? If so it counts as committed. `footer` is
        `read_footer`'s answer when the caller already has it."""
        meta, why = footer or self.layout.read_footer(shard_file(shard))
        if meta is None:
            return False, why
        stored = stored_metadata(meta)
        done, why = shard_complete(meta.num_rows, stored, self._buffers[shard].expected, self.identity)
        if done:
            self.committed[shard] = {"rows": meta.num_rows, "status_counts": stored.get("status_counts", {})}
        return done, why

    def compute_only(self, outputs: list) -> None:
        """`add` is given the values of these output kinds only; the other columns are taken from each
        shard's existing file (`keep_columns`)."""
        self.computed = outputs
        self._batch_schema = pa.schema([*self._rows_fields, *(f for kind in outputs for f in kind.fields())])
        self._from_file = [f.name for f in self.schema if f.name not in self._batch_schema.names]

    def keep_columns(self, shard: str) -> None:
        """Take the columns of the models not computed in this run from the shard's existing file."""
        self._merge.add(shard)

    def kept_and_dropped(self, shard: str, footer: tuple) -> tuple[set[str], list[str]]:
        """For a shard whose file is not complete: the run's models whose columns it holds (when it holds
        every row of the shard), and the models it holds that the run no longer has."""
        meta, _ = footer
        if meta is None:
            return set(), []
        kept, dropped = kept_and_dropped(stored_metadata(meta), self.identity)
        return (kept if meta.num_rows == self._buffers[shard].expected else set()), dropped

    def remove_stale_temporaries(self, shards: list[str]) -> None:
        """Temporary files a killed run left for these shards (never another rank's)."""
        for name in self.layout.remove_stale_temporaries(tuple(f".{shard_file(s)}" for s in shards)):
            log.info("removed leftover temporary file=%s", name)

    def add(self, rows: Rows, values: dict[str, np.ndarray]) -> None:
        """A batch's rows (any shards, in order) with the output values of each row. The batch becomes one
        Arrow table, and each shard keeps its slice of it: with many small shards per batch, the Arrow
        calls are paid per batch, not per shard."""
        table = None
        for shard, start, stop in rows.shard_runs():
            buf = self._buffers.get(shard)
            if buf is None or shard in self.failed:
                continue
            if table is None:
                table = self._table(rows, values)
            buf.parts.append(table.slice(start, stop - start))
            buf.counts.update(rows.status[start:stop])
            buf.count += stop - start
            if buf.count == buf.expected:
                self._commit(shard)
            elif buf.count > buf.expected:
                raise RuntimeError(f"shard {shard} produced more rows than its index lists ({buf.expected})")

    def fail(self, shard: str, reason: str) -> None:
        """Drop what was buffered: a shard that could not be read to its end gets no file."""
        self.failed[shard] = reason
        if shard in self._buffers:
            self._buffers[shard] = _ShardBuffer(self._buffers[shard].expected)

    def incomplete(self) -> list[str]:
        """Shards neither failed nor on disk (call `sync` first: files being written are not done yet)."""
        return [s for s in self._buffers if s not in self.failed and s not in self.committed]

    def sync(self) -> None:
        """Wait for every file handed to the writer thread, then make the renames durable: one directory
        fsync rather than one per shard (a rename lost in a crash only means that shard is redone)."""
        self._collect(keep_bytes=0)
        self.layout.sync()

    def close(self) -> None:
        self._collect(keep_bytes=0)
        self._thread.shutdown(wait=True)

    def _commit(self, shard: str) -> None:
        buf = self._buffers[shard]
        self._buffers[shard] = _ShardBuffer(buf.expected)  # the table below holds what is needed
        table = buf.parts[0] if len(buf.parts) == 1 else pa.concat_tables(buf.parts)
        metadata = {META_KEY: self._file_metadata(table.num_rows, buf.counts)}
        merge = bool(self._from_file)
        if merge and shard not in self._merge:
            raise RuntimeError(f"shard {shard} has no file to take {self._from_file[0]} from")
        if not merge:
            table = table.replace_schema_metadata(metadata)
        size = table.nbytes  # ~20 µs for a slice of a batch: once
        self._collect(keep_bytes=MAX_PENDING_BYTES - size)
        self._pending.append((shard, table.num_rows, buf.counts, size,
                              self._thread.submit(self._write_file, shard, table, metadata if merge else None)))
        self._pending_bytes += size

    def _file_metadata(self, rows: int, counts: collections.Counter) -> bytes:
        """The run's metadata with the file's row and status counts, as JSON (the run's part encoded once:
        a resolved config per shard was most of the main thread's per-shard cost)."""
        own = json.dumps({"rows": rows, "status_counts": dict(counts)})
        run = self._metadata_json
        return (own if run == "{}" else f"{run[:-1]}, {own[1:]}").encode()

    def _collect(self, keep_bytes: int) -> None:
        """Account for the files the writer thread has finished, waiting until at most `keep_bytes` of
        tables are pending. A file that cannot be written (disk full, say) fails its shard; the run goes on."""
        while self._pending and (self._pending_bytes > keep_bytes or self._pending[0][4].done()):
            shard, rows, counts, size, future = self._pending.popleft()
            self._pending_bytes -= size
            try:
                future.result()
            except (OSError, CannotMerge) as e:
                log.error("shard failed shard=%s reason=cannot write its Parquet file: %s", shard, e)
                self.failed[shard] = f"cannot write its Parquet file: {e}"
                continue
            self.committed[shard] = {"rows": rows, "status_counts": dict(counts)}
            self.rows_written += rows
            self.status_counts.update(counts)

    def _write_file(self, shard: str, table: pa.Table, metadata: dict | None) -> None:
        """`metadata`: given when the file's other columns are to be merged in first."""
        if metadata is not None:
            table = self._with_file_columns(shard, table).replace_schema_metadata(metadata)
        path = self.layout.write_parquet(shard_file(shard), table, **self._parquet_options)
        log.debug("wrote shard=%s rows=%d path=%s", shard, table.num_rows, path)

    def _with_file_columns(self, shard: str, table: pa.Table) -> pa.Table:
        """The new rows with the columns not computed now taken from the shard's file, in the run's schema."""
        try:
            old = self.layout.read_table(shard_file(shard), ["key", "status", *self._from_file])
            lined_up = old.column("key").equals(table.column("key")) and old.column("status").equals(table.column("status"))
            if lined_up:
                columns = [table.column(f.name) if f.name in table.schema.names else old.column(f.name)
                           for f in self.schema]
                return pa.table(columns, schema=self.schema)
        except (KeyError, pa.ArrowException) as e:  # a column missing or of another type in the old file
            raise CannotMerge(f"its existing file's columns cannot be kept ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]}): rerun with output.overwrite=true") from None
        raise CannotMerge("its existing file's keys or statuses differ from the shard's rows now, so its other "
                          "models' columns cannot be kept: rerun with output.overwrite=true")

    def _table(self, rows: Rows, values: dict[str, np.ndarray]) -> pa.Table:
        valid = np.array([s == OK for s in rows.status], dtype=bool)
        columns = {
            "key": pa.array(rows.keys, pa.string()),
            "shard": pa.array(rows.shards, pa.string()),
            "label": pa.array(rows.labels, pa.int64()),
            "status": pa.array(rows.status, pa.string()),
            "error": pa.array(rows.errors, pa.string()),
            **{name: pa.array(rows.components[name], pa.string()) for name in self.kept},
        }
        for kind in self.computed:
            columns.update(kind.arrays(values, valid))
        return pa.table([columns[f.name] for f in self._batch_schema], schema=self._batch_schema)


def _is_floating(type_: pa.DataType) -> bool:
    if pa.types.is_list(type_) or pa.types.is_fixed_size_list(type_):
        type_ = type_.value_type
    return pa.types.is_floating(type_)


def _parquet_path(field: pa.Field) -> str:
    """A column's path in the Parquet schema (a list's values are `<name>.list.element`)."""
    nested = pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type)
    return f"{field.name}.list.element" if nested else field.name

