"""DALI's side of reading: `fn.readers.webdataset` streams a rank's shards in order, a window of shards
per reader, `batch_size` samples per run and across shard boundaries, as raw bytes (it never fails on a
bad image). Each sample's header is checked in place, on a view of the reader's own buffer, and becomes a row.

A reader maps (or reads) every shard it is given and keeps its index for the reader's life, so a rank of
thousands of shards is read by one reader per window (`loader.dali.window_rows`/`window_bytes`): memory
stays that of one window, whatever the rank's size.

If the reader fails (a shard deleted or unreadable mid-run), a shard its error names is failed; otherwise
the shard it was in is read again alone, from where its rows already sent end, so only a shard that
fails alone is reported failed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from pipeline.batch import OK, Rows, ShardFailure
from pipeline.decode.samples import SampleRules, add_kept, one_line, parse_label, sample_status
from pipeline.shard_index import read_index
from pipeline.shards import Shard
from pipeline.stage import StageError, can_stage

log = logging.getLogger(__name__)


@dataclass
class Checked:
    """One reader batch after the header checks: its rows and the encoded images to decode."""

    rows: Rows
    encoded: object  # the reader's TensorListCPU when every row is ok, else a list of numpy views
    positions: list[int] | None  # rows the decoded images belong to; None: all of them
    token: int | None = None  # the decode stage's handle, once started
    source: object = None  # the reader whose buffers `encoded` points into


def windows(shards: list[Shard], max_rows: int, max_bytes: int, max_shards: int | None = None) -> Iterator[list[Shard]]:
    """Consecutive shards, as few per window as reach `max_rows` samples, `max_bytes` or `max_shards` (one
    at least)."""
    window, rows, size = [], 0, 0
    for shard in shards:
        window.append(shard)
        rows += shard.count or 0
        size += _size(shard.path)
        if rows >= max_rows or size >= max_bytes or len(window) == max_shards:
            yield window
            window, rows, size = [], 0, 0
    if window:
        yield window


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # remote, or gone: the reader says so


def checked_batches(shards: list[Shard], rules: SampleRules, batch_size: int, loader, stopped: Callable[[], bool],
                    retired: list, stager=None) -> Iterator[Checked | ShardFailure]:
    """Every sample of `shards`, in order, as checked batches of at most `batch_size` rows (the last of
    each window of shards may be short), one reader per window, and WINDOW_DONE after each window. A
    reader that is done goes to `retired`, for the caller to shut down (`shut_down`) once no batch it
    gave is in use: best before the next window's reader is built, so that two are never alive at once.
    With a `stager` (pipeline.stage), remote shards are read from their staged copies, half of its
    shards ahead in each window, so the next window is fetched while this one is read."""
    d = loader.dali
    for window in windows(shards, d.window_rows, d.window_bytes, stager and max(1, stager.ahead // 2)):
        if stopped():
            return
        readable = window
        if stager is not None:
            readable = []
            for shard in window:
                try:
                    readable.append(replace(shard, path=stager.local(shard)) if can_stage(shard) else shard)
                except StageError as e:
                    log.error("shard failed shard=%s reason=%s", shard.path, e)
                    yield ShardFailure(shard.name, str(e))
        if readable:
            yield from _window_batches(readable, rules, batch_size, loader, stopped, retired)
        yield WINDOW_DONE  # the caller finishes this window's batches and frees its reader before the next
        if stager is not None:
            for shard in window:
                stager.release(shard)


WINDOW_DONE = "window done"


def _window_batches(shards: list[Shard], rules: SampleRules, batch_size: int, loader,
                    stopped: Callable[[], bool], retired: list) -> Iterator[Checked | ShardFailure]:
    """Every sample of `shards`, in order, as checked batches of at most `batch_size` rows.

    One reader streams all shards. If it fails (a shard deleted or unreadable mid-run), a shard its
    error names is failed; otherwise the shard it was in is read again alone, from where its rows
    already sent end, so only a shard that fails alone is reported failed. Then one reader streams the
    rest again."""
    shards = list(shards)
    start, skip = 0, 0
    while start < len(shards):
        progress = _Progress(start, skip)
        try:
            yield from _read(shards, progress, rules, batch_size, loader, stopped, retired)
            return
        except _ReaderFailed as failure:
            start, skip = progress.shard, progress.position
            if failure.shard is not None and failure.shard >= start:  # DALI named the file: fail that one
                bad = shards.pop(failure.shard)
                log.error("shard failed shard=%s reason=%s", bad.path, failure.reason)
                yield ShardFailure(bad.name, failure.reason)
                skip = 0 if failure.shard == start else skip
                continue
            if skip == shards[start].count:  # that shard was sent whole: the failure is in the next one
                start, skip = start + 1, 0
        shard = shards[start]
        alone = _Progress(start, skip)
        try:
            yield from _read(shards[: start + 1], alone, rules, batch_size, loader, stopped, retired)
        except _ReaderFailed as failure:
            log.error("shard failed shard=%s reason=%s", shard.path, failure.reason)
            yield ShardFailure(shard.name, failure.reason)
        start, skip = start + 1, 0


@dataclass
class _Progress:
    """Where the rows sent so far end: shard (index into the list) and samples of it."""

    shard: int
    position: int


class _ReaderFailed(Exception):
    def __init__(self, reason: str, shard: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.shard = shard  # the shard (index into the list) the error names, if it names one


def _failure(error: Exception, shards: list[Shard], first: int) -> _ReaderFailed:
    message = str(error)
    named = [i for i, s in enumerate(shards) if i >= first and s.path in message]
    return _ReaderFailed(one_line(message.split("Current pipeline object")[0]), named[0] if len(named) == 1 else None)


def _read(shards: list[Shard], progress: _Progress, rules: SampleRules, batch_size: int, loader,
          stopped: Callable[[], bool], retired: list) -> Iterator[Checked]:
    """The samples of shards[progress.shard:] after the first progress.position, as checked batches;
    `progress` follows the rows sent."""
    first = progress.shard
    todo = shards[first:]
    exts = sorted({e for s in todo for e in s.extensions})
    image_exts = {e for e in exts if rules.is_image(e)}
    label_exts = {e for e in exts if rules.is_label(e)}
    kept = {name: {e for e in exts if e.lower() == name} for name in rules.keep}
    kept = {name: found for name, found in kept.items() if found}  # no shard has it: the column stays null
    groups = [sorted(image_exts), sorted(label_exts), *(sorted(found) for found in kept.values())]
    try:
        reader = _build_reader(todo, groups, batch_size, loader.threads, loader.dali.mmap) if image_exts else None
    except RuntimeError as e:
        raise _failure(e, shards, first) from None
    try:
        total = sum(s.count for s in todo)
        shard_index, position, skip = progress.shard - 1, 0, progress.position
        index, has_image, has_label, has_kept, seen = None, [], [], {}, set()
        for done in range(0, total, batch_size):
            if stopped():
                return
            n = min(batch_size, total - done)
            try:
                outputs = reader.run() if reader is not None else ()
            except RuntimeError as e:
                raise _failure(e, shards, first) from None
            images = _Buffer(outputs[0]) if reader is not None else None
            labels = _Buffer(outputs[1]) if reader is not None and label_exts else None
            first_text = 2 if label_exts else 1
            texts = {name: _Buffer(outputs[first_text + i]) for i, name in enumerate(kept)} if reader is not None else {}
            rows, ok = Rows(), []
            for j in range(n):
                while index is None or position == len(index.keys):
                    shard_index += 1
                    shard = shards[shard_index]
                    index, position, seen = read_index(shard.index_path), 0, set()
                    has_image = [not image_exts.isdisjoint(e) for e in index.extensions]
                    has_label = [not label_exts.isdisjoint(e) for e in index.extensions]
                    has_kept = {name: [not found.isdisjoint(e) for e in index.extensions] for name, found in kept.items()}
                key = index.keys[position]
                image, label = has_image[position], has_label[position]
                present = {name: flags[position] for name, flags in has_kept.items()}
                position += 1
                if skip:  # sent before the reader that was reading this shard failed
                    skip -= 1
                    seen.add(key)
                    continue
                status, error = sample_status(key, images.view(j) if image else None, rules, seen)
                rows.keys.append(key)
                rows.shards.append(shard.name)
                rows.labels.append(parse_label(labels.bytes(j)) if label else None)
                rows.status.append(status)
                rows.errors.append(error)
                for name in rules.keep:
                    add_kept(rows, name, texts[name].view(j) if present.get(name) and name in texts else None)
                if status == OK:
                    ok.append(j)
            progress.shard, progress.position = shard_index, position
            if not rows:
                continue
            if len(ok) == len(rows) == len(outputs[0]):
                yield Checked(rows, outputs[0], None, source=reader)  # every sample decodes: DALI's own batch
            else:
                skipped = n - len(rows)  # rows skipped at the start of this batch
                yield Checked(rows, [images.array(j) for j in ok] or None, [j - skipped for j in ok], source=reader)
    finally:
        if reader is not None:
            retired.append(reader)  # its outputs may still be in the decode stage's hands


class _Buffer:
    """The samples of one reader output (contiguous in memory) as zero-copy views."""

    def __init__(self, tensor_list):
        sizes = np.fromiter((s[0] for s in tensor_list.shape()), dtype=np.int64, count=len(tensor_list))
        self.ends = np.cumsum(sizes).tolist()
        self.starts = [0] + self.ends[:-1]
        self.data = np.asarray(tensor_list.as_reshaped_tensor([int(sizes.sum())])) if len(sizes) else np.empty(0, np.uint8)
        self.memory = memoryview(self.data)

    def view(self, j: int) -> memoryview:
        return self.memory[self.starts[j] : self.ends[j]]

    def array(self, j: int) -> np.ndarray:
        return self.data[self.starts[j] : self.ends[j]]

    def bytes(self, j: int) -> bytes:
        return self.memory[self.starts[j] : self.ends[j]].tobytes()


def shut_down(pipe) -> None:
    """Free a DALI pipeline's buffers and threads now: a pipeline sits in reference cycles, and left to
    the cycle collector a finished window's reader would hold its memory (and mappings) for a while."""
    if pipe is not None:
        pipe._shutdown()  # what DALI's own __del__ and its exit handler call


def _build_reader(shards: list[Shard], groups: list[list[str]], batch_size: int, threads: int, mmap: bool = True):
    """A reader with one output per group of extensions (image, label, kept components; an empty group,
    a label no shard has, gives no output)."""
    from nvidia.dali import fn, pipeline_def, types

    ext = [";".join(group) for group in groups if group]

    # exec_dynamic: an output stays valid while referenced (a batch's encoded images until it is decoded).
    @pipeline_def(batch_size=batch_size, num_threads=max(1, threads), device_id=None, prefetch_queue_depth=2,
                  exec_dynamic=True)
    def reader():
        outputs = fn.readers.webdataset(
            paths=[s.path for s in shards], index_paths=[s.index_path for s in shards], ext=ext,
            missing_component_behavior="empty", dtypes=[types.UINT8] * len(ext), pad_last_batch=True,
            dont_use_mmap=not mmap, name="reader")
        return tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)

    pipe = reader()
    pipe.build()
    return pipe
