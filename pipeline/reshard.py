"""New WebDataset shards of the selected samples, copied by byte ranges: for each sample, its tar headers
and data as they lie in the source shard (found through the shard's index file), nothing decoded or
encoded. Each new shard `<prefix>-NNNNNN.tar` holds `shard_size` samples in the selection's order and
gets its index file, so shardscore, webdataset and DALI read it as they read the originals.

Resumable: the selection is fixed once (`_selection.parquet` in the new folder) and a new shard is
complete when its index file exists, written after the tar (and its scores) are in place; a rerun
writes only the shards that are not, and one over a finished folder (`_SUCCESS`) does nothing.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import mmap
import tarfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.cluster import cpus_available
from pipeline.errors import UserError
from pipeline.layout import SUCCESS, OutputLayout, is_url
from pipeline.select import META_KEY, BATCH_ROWS, connect, query, run_query, write_selection
from pipeline.shard_index import INDEX_VERSION, index_lines, keys_of_names, spans

log = logging.getLogger(__name__)

SELECTION = "_selection.parquet"
PROGRESS_EVERY_S = 10.0
COMMITTERS = 4
GATHER_BYTES = 1 << 20  # small pieces are gathered into writes of about this size (see _TarOut)
ROW_COLUMNS = ("key", "shard", "file_row_number")  # not part of a sample's scores


def reshard(settings, scores, metadata: dict) -> dict:
    """Write (or finish) the new shards; returns the counts for the summary."""
    r = settings.reshard
    out = OutputLayout(r.dir)
    for name in out.remove_stale_temporaries((".",)):
        log.info("removed leftover temporary file=%s", name)
    plan = {"where": settings.where, "join": settings.join, "join_on": settings.join_on, "scores": settings.output_dir,
            "identity": scores.identity, "shard_size": r.shard_size, "prefix": r.prefix, "scores_as": r.scores}
    if out.exists(SUCCESS) and not r.overwrite:
        done = out.read_json(SUCCESS)
        if done.get("plan") == plan:
            log.info("reshard.dir %s is complete already: nothing to do", r.dir)
            return {**done["summary"], "shards_written": 0, "shards_kept": done["summary"]["shards"], "bytes_written": 0}
    if out.exists(SELECTION):
        stored = _stored(out)
        if stored.get("plan") != plan:
            if not r.overwrite:
                raise UserError(f"reshard.dir {r.dir} holds the shards of another selection ({_differs(stored.get('plan') or {}, plan)}); "
                                "choose another reshard.dir, or give reshard.overwrite=true to replace them")
            _clear(out, {r.prefix, (stored.get("plan") or {}).get("prefix") or r.prefix})
    if not out.exists(SELECTION):
        con = connect(settings, settings.output_dir, settings.join or "")
        columns = "*" if r.scores != "none" else "key, shard, file_row_number"
        reader = run_query(con, query(scores, settings, columns), settings)
        try:
            rows = write_selection(out, SELECTION, reader, {**metadata, "plan": plan})
        finally:
            con.close()
        log.info("selection rows=%d written to %s", rows, out.path(SELECTION))
    with out.open_read(SELECTION) as f:
        summary = _copy_all(out, settings, scores, pq.ParquetFile(f))
    summary["reshard_dir"] = r.dir
    out.sync()  # the renames of the new shards are on disk before _SUCCESS says they are done
    out.write_json(SUCCESS, {"plan": plan, "summary": {k: v for k, v in summary.items()
                                                        if k not in ("shards_written", "shards_kept", "bytes_written")},
                             "finished_at": time.time()})
    return summary


def _stored(out: OutputLayout) -> dict:
    meta, why = out.read_footer(SELECTION)
    if meta is None:
        return {}
    return json.loads((meta.metadata or {}).get(META_KEY, b"{}"))


def _differs(old: dict, new: dict) -> str:
    key = next(k for k in [*new, *old] if old.get(k) != new.get(k))
    return f"{key} was {old.get(key)!r}, now {new.get(key)!r}"


def _clear(out: OutputLayout, prefixes: set[str]) -> None:
    """Another selection's files: its shards' index files first (a shard without one is not complete,
    so a kill midway leaves nothing a rerun would take for done), then the shards, the selection last."""
    names = out.listdir()
    ours = [n for n in names if any(n.startswith(f"{p}-") for p in prefixes)]
    for name in [n for n in ours if n.endswith(".idx")] + [n for n in ours if not n.endswith(".idx")] + [SUCCESS, SELECTION]:
        out.remove(name)


def _copy_all(out: OutputLayout, settings, scores, selection: pq.ParquetFile) -> dict:
    r = settings.reshard
    total = selection.metadata.num_rows
    count = -(-total // r.shard_size)
    names = [f"{r.prefix}-{i:06d}" for i in range(count)]
    present = set(out.listdir())
    finished = {n for n in names if f"{n}.idx" in present and f"{n}.tar" in present}
    paths = scores.shard_paths
    if paths is None:
        raise UserError("resharding needs the scored shards: give data.shards=… (the scores do not say them, "
                        "or they match no file from here)")
    workers = r.workers or cpus_available()
    sources = Sources(paths, settings.index_cache_dir)
    # A new shard is committed (its tar synced, then its index written) by threads of their own while
    # the copying threads go on: they never wait for the disk. Several commit at once: the disk is kept
    # busy with more than one file's writes (a tenth faster here than one at a time).
    committer = ThreadPoolExecutor(COMMITTERS, thread_name_prefix="shardscore-reshard-commit")
    commits: list[Future] = []

    def commit(name: str, index: bytes) -> None:
        out.make_durable(f"{name}.tar")
        out.write_bytes(f"{name}.idx", index)

    def write(i: int, table: pa.Table) -> int:  # new shards are written side by side, by `workers` threads
        size, index = write_shard(out, names[i], table, sources, r.scores)
        commits.append(committer.submit(commit, names[i], index))
        if r.debug_delay_s:
            time.sleep(r.debug_delay_s)
        return size

    written = bytes_written = 0
    last_log = time.monotonic()
    with ThreadPoolExecutor(workers, thread_name_prefix="shardscore-reshard") as pool:
        pending: collections.deque = collections.deque()
        for i, table in enumerate(_slices(selection, r.shard_size)):
            if names[i] not in finished:
                pending.append((i, pool.submit(write, i, table)))
            while pending and (len(pending) > workers or pending[0][1].done()):
                done, future = pending.popleft()
                bytes_written += future.result()
                written += 1
                if time.monotonic() - last_log >= PROGRESS_EVERY_S:
                    last_log = time.monotonic()
                    log.info("reshard shards=%d/%d written=%d samples=%d bytes=%d", done + 1, count, written,
                             min(total, (done + 1) * r.shard_size), bytes_written)
        for _, future in pending:
            bytes_written += future.result()
            written += 1
    with committer:
        for future in commits:
            future.result()
    return {"samples": total, "shards": count, "shards_written": written, "shards_kept": len(finished),
            "bytes_written": bytes_written}


def _slices(selection: pq.ParquetFile, size: int):
    """The selection, `size` rows at a time, as tables."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in selection.iter_batches(BATCH_ROWS):
        pending.append(batch)
        held += batch.num_rows
        while held >= size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


class Sources:
    """The scored shards by name; each one's index parsed once and its bytes mapped once, shared by the
    threads that write new shards (consecutive new shards take from the same source shard)."""

    KEEP = 8  # source shards held open, besides those being read

    def __init__(self, paths: dict[str, str], cache_dir: str | None):
        self.paths, self.cache_dir = paths, cache_dir
        self._open: collections.OrderedDict[str, Future] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, shard: str) -> SourceShard:
        """The shard, read by the first thread that asks for it (others wait for that one, not for the
        reading of other shards)."""
        with self._lock:
            opening = self._open.get(shard)
            first = opening is None
            if first:
                opening = self._open[shard] = Future()
                # least recently used first; one being read stays (a dropped one is unmapped once unused)
                for name in [n for n, f in self._open.items() if f.done()][:max(0, len(self._open) - self.KEEP)]:
                    del self._open[name]
            else:
                self._open.move_to_end(shard)
        if first:
            try:
                opening.set_result(self._read(shard))
            except BaseException as e:
                opening.set_exception(e)
        return opening.result()

    def _read(self, shard: str) -> SourceShard:
        from pipeline.shards import index_for

        path = self.paths.get(shard)
        if path is None:
            raise UserError(f"the selection names shard {shard}, which data.shards does not hold")
        if not path.endswith(".tar"):
            raise UserError(f"shard {path}: resharding copies byte ranges of plain .tar shards, not compressed ones")
        idx, why = index_for(path, self.cache_dir)
        if idx is None:
            raise UserError(f"shard {path}: {why}")
        return SourceShard.read(shard, path, idx)


@dataclass
class SourceShard:
    """A source shard's index (the samples' keys; where their components lie) and its bytes."""

    name: str
    path: str
    plain: PlainLayout | None  # the samples all have the same number of components
    lines: pa.Array | None  # else: the index lines
    reader: _RangeReader
    _keys: pa.Array | None = None

    @classmethod
    def read(cls, name: str, path: str, idx: str) -> SourceShard:
        columns = _uniform_index(idx)
        if columns is None:
            keys, lines, _ = index_lines(idx)
            return cls(name, path, None, lines, _RangeReader(path), keys)
        c = len(columns) // 4
        plain = PlainLayout.of([columns[4 * k] for k in range(c)],
                               np.stack([columns[4 * k + 1].to_numpy() for k in range(c)], axis=1),
                               np.stack([columns[4 * k + 2].to_numpy() for k in range(c)], axis=1),
                               [columns[4 * k + 3] for k in range(c)])
        return cls(name, path, plain, None, _RangeReader(path))

    @functools.cached_property
    def sample_bytes(self) -> pa.Array | None:
        """Locally, for a shard whose samples are all plain and lie one after the other: each sample's
        bytes, as Arrow binary values over the mapped file (nothing copied), so that Arrow's `take`
        gathers the selected ones in one call, outside the interpreter's lock."""
        p, mapped = self.plain, self.reader.map
        if p is None or mapped is None or not len(p.begin) or p.begin[0] != 0 or not p.plain.all() \
                or len(mapped) < p.end[-1]:
            return None
        bounds = pa.array(np.append(p.begin, p.end[-1]), pa.int64())
        return pa.Array.from_buffers(pa.large_binary(), len(p.begin), [None, bounds.buffers()[1], pa.py_buffer(mapped)])

    @property
    def keys(self) -> pa.Array:
        if self._keys is None:  # a plain shard's, needed only when its scores are not in its tar order
            self._keys = keys_of_names(self.plain.names[0])
        return self._keys

    def positions(self, keys: pa.Array, rows: np.ndarray | None = None) -> np.ndarray:
        """Where the keys are in the shard's index: at `rows`, their rows in the shard's scores (written
        in its tar order), when the index's first member names there are `<key>.<extension>`; else
        looked up by key."""
        plain = self.plain
        if rows is not None and plain is not None and len(rows) and rows.min() >= 0 and rows.max() < len(plain.begin):
            at = pa.array(rows)
            expected = pc.binary_join_element_wise(keys, plain.exts[0].take(at), ".")
            if pc.all(pc.equal(plain.names[0].take(at), expected)).as_py():
                return rows
        where = pc.index_in(keys, value_set=self.keys)
        if where.null_count:
            missing = keys[where.is_null().to_pylist().index(True)].as_py()
            raise UserError(f"shard {self.name} ({self.path}) holds no sample {missing!r} any more: it changed "
                            "after it was scored; score it again before selecting")
        return where.to_numpy()

    def samples(self, where: np.ndarray, keys: list[str]) -> list[tuple[str, list[tuple[str, int, int]]]]:
        """Each sample's [(extension, data offset, size), …] in the tar."""
        if self.plain is None:
            return [(key, spans(line)) for key, line in zip(keys, self.lines.take(pa.array(where)).to_pylist())]
        p = self.plain
        exts = [e.take(pa.array(where)).to_pylist() for e in p.exts]
        offsets, sizes = p.offsets[where].tolist(), p.sizes[where].tolist()
        return [(key, [(exts[k][i], offsets[i][k], sizes[i][k]) for k in range(len(exts))]) for i, key in enumerate(keys)]

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list:
        return self.reader.read(ranges)


def _uniform_index(idx: str) -> list[pa.Array] | None:
    """An index file whose lines all have the same components, parsed as a space-separated table (in C,
    where splitting the lines one by one cost most of a reshard's CPU); None for any other."""
    with open(idx, "rb") as f:
        header, width = f.readline().split(), len(f.readline().split())
    if len(header) != 2 or not header[0].startswith(b"v1.") or width < 4 or width % 4:
        return None
    names = [f"f{i}" for i in range(width)]
    try:  # Arrow reads the file itself, into its own (reused) memory
        table = pacsv.read_csv(idx, read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, use_threads=False),
                               parse_options=pacsv.ParseOptions(delimiter=" ", quote_char=False),
                               convert_options=pacsv.ConvertOptions(column_types={
                                   n: pa.int64() if i % 4 in (1, 2) else pa.string() for i, n in enumerate(names)}))
    except (pa.ArrowInvalid, ValueError):  # lines of other widths
        return None
    if table.num_rows != int(header[1]):
        return None
    return [table.column(n).combine_chunks() for n in names]


@dataclass
class PlainLayout:
    """A shard whose samples all have the same number of components (what webdataset and img2dataset
    write): per sample, where its bytes begin and end and whether they are plain ustar members one after
    the other, and per component its extension, data offset, size and name, as arrays. Plain samples are
    copied in runs, their index lines built by Arrow, with no Python work per sample."""

    begin: np.ndarray  # the first header's offset
    end: np.ndarray  # after the last component's padding
    plain: np.ndarray  # bool: the sample's bytes are exactly its ustar headers, data and padding
    offsets: np.ndarray  # [samples, components]
    sizes: np.ndarray
    exts: list[pa.Array]  # per component
    names: list[pa.Array]

    @classmethod
    def of(cls, exts: list[pa.Array], offsets: np.ndarray, sizes: np.ndarray, names: list[pa.Array]) -> PlainLayout:
        padded_end = offsets + (sizes + 511) // 512 * 512
        begin, end = offsets[:, 0] - 512, padded_end[:, -1]
        plain = np.all(offsets[:, 1:] - 512 == padded_end[:, :-1], axis=1)
        plain &= begin == np.concatenate([[0], end[:-1]])  # no other headers (pax, long names) in between
        return cls(begin, end, plain, offsets, sizes, exts, names)


class _RangeReader:
    """Byte ranges of one shard: views of a memory map locally (the page cache's bytes, not copied here),
    a batch of concurrent range requests in object storage."""

    def __init__(self, path: str):
        self.path, self.map = path, None
        if is_url(path):
            from pipeline.layout import filesystem

            self.fs, self.inner = filesystem(path)
        else:
            with open(path, "rb") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.view = memoryview(self.map)

    def read(self, ranges: list[tuple[int, int]]) -> list[memoryview]:
        """The ranges' bytes (sorted ranges); remote ones fetched in blocks that span many of them where
        they lie close: a selection of small samples costs a few large requests, not one per sample."""
        if self.map is not None:
            return [self.view[a:b] for a, b in ranges]
        blocks, members = _blocks(ranges)
        try:
            data = self.fs.cat_ranges([self.inner] * len(blocks), [a for a, _ in blocks], [b for _, b in blocks],
                                      on_error="raise")
        except (OSError, ValueError) as e:
            raise UserError(f"shard {self.path}: cannot read it ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
        views = []
        for (start, _), block, (first, last) in zip(blocks, data, members):
            view = memoryview(block)
            views += [view[a - start:b - start] for a, b in ranges[first:last]]
        return views

BLOCK_BYTES = 8 << 20  # the largest read that covers several ranges
BLOCK_WASTE = 4  # … when it reads at most this many times the bytes asked for


def _blocks(ranges: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(reads covering the ranges, the [first, last) ranges each covers)."""
    blocks: list[list[int]] = []
    members: list[list[int]] = []
    wanted = 0
    for i, (a, b) in enumerate(ranges):
        if blocks and b - blocks[-1][0] <= BLOCK_BYTES and (b - blocks[-1][0]) <= BLOCK_WASTE * (wanted + b - a):
            blocks[-1][1] = max(blocks[-1][1], b)
            members[-1][1] = i + 1
            wanted += b - a
        else:
            blocks.append([a, b])
            members.append([i, i + 1])
            wanted = b - a
    return [(a, b) for a, b in blocks], [(a, b) for a, b in members]


def _padded(n: int) -> int:
    return (n + 511) // 512 * 512


def write_shard(out: OutputLayout, name: str, table: pa.Table, sources: Sources, scores_as: str) -> tuple[int, bytes]:
    """One new shard's tar (renamed into place, not yet synced) and its scores if asked. Returns the
    tar's bytes and its index file's content, to be written once the tar is on disk."""
    keys = table.column("key").combine_chunks().cast(pa.string())
    rows = table.column("file_row_number").to_numpy() if "file_row_number" in table.column_names else None
    score_rows = _score_rows(table) if scores_as == "json" else None
    with _TarOut(out, f"{name}.tar") as tar:
        for shard, start, stop in _runs(table.column("shard").combine_chunks()):
            source = sources.get(shard)
            run_keys = keys.slice(start, stop - start)
            where = source.positions(run_keys, None if rows is None else rows[start:stop])
            copied = score_rows is None and source.plain is not None and source.plain.plain[where].all() and \
                _copy_plain(tar, source, where)
            if not copied:
                _copy_samples(tar, source, source.samples(where, run_keys.to_pylist()),
                              score_rows[start:stop] if score_rows is not None else None)
            tar.flush()  # before the next run: the views are of this source's mapped bytes
    if scores_as == "parquet":
        out.write_parquet(f"{name}.parquet", table.drop_columns([c for c in ("file_row_number",) if c in table.column_names]),
                          compression="zstd")
    return tar.pos, tar.index()


def _copy_plain(tar: _TarOut, source: SourceShard, where: np.ndarray) -> bool:
    """Samples of a plain shard, copied as they lie (gathered by Arrow, or as runs of neighbours), their
    index lines built in Arrow. False (and nothing written) when the first header of the first or last
    sample is not what the index says (the shard changed)."""
    plain = source.plain
    begin, end = plain.begin[where], plain.end[where]
    samples = source.sample_bytes
    if samples is not None:
        data = None
        headers = source.read_ranges([(int(plain.begin[i]), int(plain.begin[i]) + 512) for i in (where[0], where[-1])])
    else:
        breaks = np.flatnonzero(begin[1:] != end[:-1]) + 1
        ranges = list(zip(begin[np.concatenate([[0], breaks])].tolist(),
                          end[np.concatenate([breaks - 1, [len(where) - 1]])].tolist()))
        data = source.read_ranges(ranges)
        if sum(map(len, data)) != sum(b - a for a, b in ranges):
            raise _changed(source, "it is shorter than its index says")
        headers = [data[0][:512], data[-1][int(begin[-1]) - ranges[-1][0]:][:512]]
    # The index is fresh (not older than the tar); that its headers are where it says is checked for the
    # first and the last sample, not for every one.
    for i, header in zip((where[0], where[-1]), headers):
        header = bytes(header)
        if header[:100].rstrip(b"\0") != plain.names[0][int(i)].as_py().encode() or header[345:346] != b"\0":
            return False
    starts = tar.pos + np.concatenate([[0], np.cumsum(end - begin)[:-1]])  # each sample's begin in the new tar
    delta = starts - begin
    at = pa.array(where)
    columns = []
    for k in range(plain.offsets.shape[1]):
        columns += [plain.exts[k].take(at), pa.array(plain.offsets[where, k] + delta).cast(pa.string()),
                    pa.array(plain.sizes[where, k]).cast(pa.string()), plain.names[k].take(at)]
    if data is None:
        tar.write_taken(samples, at)
    else:
        tar.write_all(data)
    tar.add_lines(pc.binary_join_element_wise(pc.binary_join_element_wise(*columns, " "), "", "\n"))
    return True


def _copy_samples(tar: _TarOut, source: SourceShard, samples: list, score_rows: list[str] | None) -> None:
    """Sample by sample: verbatim where a sample's bytes are plain ustar members, under new headers where
    not; with a `scores.json` component each when asked."""
    ranges = [(comps[0][1] - 512, comps[-1][1] + _padded(comps[-1][2])) for _, comps in samples]
    for i, ((key, comps), (begin, end), data) in enumerate(zip(samples, ranges, source.read_ranges(ranges))):
        if len(data) != end - begin:
            raise _changed(source, f"it ends before byte {end}")
        view = memoryview(data)
        if _verbatim(view, begin, key, comps):
            tar.copy(view, begin, [(key, comps)])
        else:  # other headers before some member (pax records, a GNU long name): the data, under new ones,
            # where the header right before each component's data is that member's
            for ext, off, size in comps:
                if not _member_header(bytes(view[off - 512 - begin: off - begin]), size):
                    raise _changed(source, f"no tar header of {key}.{ext} where its index puts it")
            tar.add_sample(key, [(ext, view[off - begin: off - begin + size]) for ext, off, size in comps])
        if score_rows is not None:
            tar.add_component(key, "scores.json", score_rows[i].encode())


class _TarOut:
    """A tar being written atomically, with the index lines of what it holds. Small pieces (samples of a
    few KB) are gathered in memory, by Arrow's `take` or a join, into writes of about GATHER_BYTES:
    measured here, that costs half what a `writev` of the same pieces does (the kernel's cost is per
    piece). A large piece is written as it is."""

    def __init__(self, out: OutputLayout, name: str):
        self._opening = out.open_atomic(name, buffering=0, sync=False)
        self.lines: list = []  # the index's lines: one str each, or Arrow strings of many (each ending "\n")
        self.samples = 0
        self.pos = 0
        self._pending: list = []
        self._pending_bytes = 0

    def __enter__(self):
        self.f = self._opening.__enter__()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.write(bytes(1024))  # the end-of-archive marker
            self.flush()
        self._pending.clear()
        return self._opening.__exit__(*exc)

    def index(self) -> bytes:
        """The index file of what was written."""
        pieces = [f"{INDEX_VERSION} {self.samples}\n".encode()]
        for lines in self.lines:
            pieces += [lines.encode(), b"\n"] if isinstance(lines, str) else [_bytes_of(lines)]
        return b"".join(pieces)

    def add_lines(self, lines: pa.Array) -> None:
        self.lines.append(lines)
        self.samples += len(lines)

    def write(self, data) -> None:
        size = len(data)
        self.pos += size
        if size >= GATHER_BYTES:
            self.flush()
            self._write(data)
            return
        self._pending.append(data)
        self._pending_bytes += size
        if self._pending_bytes >= GATHER_BYTES:
            self.flush()

    def write_all(self, views: list) -> None:
        for view in views:
            self.write(view)

    def write_taken(self, values: pa.Array, at: pa.Array) -> None:
        """The binary values at `at`, gathered by Arrow a write's worth (about GATHER_BYTES) at a time."""
        self.flush()
        per = max(1, GATHER_BYTES * len(values) // max(len(_bytes_of(values)), 1))
        for start in range(0, len(at), per):
            data = _bytes_of(values.take(at[start:start + per]))
            self._write(data)
            self.pos += len(data)

    def flush(self) -> None:
        """Write what is gathered (before the views it holds go: a source's memory map is closed)."""
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            self._write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _write(self, data) -> None:
        view, done = memoryview(data), 0
        while done < len(view):  # a short write: the rest next (a file object that says nothing wrote it all)
            written = self.f.write(view[done:])
            done = len(view) if written is None else done + written

    def copy(self, data, begin: int, samples: list) -> None:
        """Bytes of the source from offset `begin`: `samples`' headers and data, as they lie there."""
        for key, comps in samples:
            self.lines.append(" ".join(f"{ext} {self.pos + off - begin} {size} {key}.{ext}" for ext, off, size in comps))
            self.samples += 1
        self.write(data)

    def add_sample(self, key: str, comps: list[tuple[str, bytes]]) -> None:
        self.lines.append(" ".join(self._member(f"{key}.{ext}", ext, data) for ext, data in comps))
        self.samples += 1

    def add_component(self, key: str, ext: str, data: bytes) -> None:
        self.lines[-1] += " " + self._member(f"{key}.{ext}", ext, data)

    def _member(self, name: str, ext: str, data) -> str:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        header = info.tobuf(tarfile.PAX_FORMAT)  # ustar when the name fits, pax records when it does not
        at = self.pos + len(header)
        for part in (header, data, bytes(-len(data) % 512)):
            self.write(part)
        return f"{ext} {at} {len(data)} {name}"


def _bytes_of(values: pa.Array) -> memoryview:
    """The bytes of Arrow string or binary values, one after the other, without copying them."""
    width = 8 if pa.types.is_large_binary(values.type) or pa.types.is_large_string(values.type) else 4
    offsets = np.frombuffer(values.buffers()[1], f"<i{width}", len(values) + 1, values.offset * width)
    data = values.buffers()[2]
    return memoryview(data)[offsets[0]:offsets[-1]] if data is not None else memoryview(b"")


def _runs(values: pa.Array):
    """(value, start, stop) of each run of equal values."""
    if not len(values):
        return
    changes = np.flatnonzero(pc.not_equal(values[1:], values[:-1]).to_numpy(zero_copy_only=False)) + 1
    bounds = [0, *changes.tolist(), len(values)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        yield values[start].as_py(), start, stop


def _verbatim(view, begin: int, key: str, comps: list[tuple[str, int, int]]) -> bool:
    """The sample's bytes (in `view`, which starts at source offset `begin`) are plain ustar headers,
    each followed by its component's data and padding, one after the other: then they are copied as
    they are."""
    expected = comps[0][1] - 512
    for ext, off, size in comps:
        if off - 512 != expected:
            return False
        header = bytes(view[off - 512 - begin: off - begin])
        if header[156:157] not in (b"0", b"\0") or header[345:346] != b"\0" or \
                header[0:100].rstrip(b"\0") != f"{key}.{ext}".encode() or int(header[124:136].strip(b" \0") or b"0", 8) != size:
            return False
        expected = off + _padded(size)
    return True


def _member_header(header: bytes, size: int) -> bool:
    """A tar header of a regular file of `size` bytes, its checksum right."""
    try:
        return len(header) == 512 and header[156:157] in (b"0", b"\0") and \
            int(header[124:136].strip(b" \0") or b"0", 8) == size and \
            int(header[148:156].strip(b" \0") or b"0", 8) == sum(header) - sum(header[148:156]) + 256
    except ValueError:
        return False


def _changed(source: SourceShard, why: str) -> UserError:
    return UserError(f"shard {source.path} changed since it was indexed ({why}); score it again (its index "
                     "and its rows) before resharding")


def _score_rows(table: pa.Table) -> list[str]:
    """Each row's score columns as JSON."""
    kept = table.drop_columns([c for c in ROW_COLUMNS if c in table.column_names])
    return [json.dumps(row, default=str) for row in kept.to_pylist()]
