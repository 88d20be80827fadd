"""NVIDIA DALI back-end: `fn.readers.webdataset` reads the shards, `fn.decoders.image` decodes.

Two pipelines. One reader streams every shard of this rank in order, `batch_size` samples per run and
across shard boundaries, as raw bytes: it never fails on a bad image. Python then checks each sample's
header in place (a view of the reader's buffer, no copy) and feeds the good ones to the decode
pipeline, which decodes, resizes and crops while Python checks the next batch. A batch that still
fails to decode (a truncated JPEG, say) is searched in parts so only images that fail alone become
`decode_error`; an out-of-memory error frees memory and retries the same images in smaller decode
batches, and is never written as a bad image.
Device `mixed` (nvJPEG, output stays on the GPU) on CUDA, `cpu` otherwise: the same code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import device as dev
from pipeline.batch import OK, Batch, Rows, ShardFailure
from pipeline.decode.assemble import BackgroundBatches, Normalizer, Preprocess
from pipeline.decode.samples import SampleRules, add_kept, one_line, parse_label, sample_status
from pipeline.errors import OutOfMemoryAtOneRow
from pipeline.scorer import MicroBatchPolicy, is_oom
from pipeline.shards import Shard, read_index

log = logging.getLogger(__name__)

INTERP = {"bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC", "nearest": "INTERP_NN"}


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class _Checked:
    """One reader batch after the header checks: its rows and the encoded images to decode."""

    rows: Rows
    encoded: object  # the reader's TensorListCPU when every row is ok, else a list of numpy views
    positions: list[int] | None  # rows the decoded images belong to; None: all of them


class DaliDecoder:
    """Yields fixed-size Batches (and ShardFailures) for `shards`, in shard order."""

    def __init__(self, shards: list[Shard], rules: SampleRules, preprocess: Preprocess, batch_size: int,
                 device: torch.device, dtype: torch.dtype, loader, inject_oom_above: int | None = None):
        self.shards = shards
        self.rules = rules
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.loader = loader
        self._stage: _DecodeStage | None = None
        self._counts = (0, 0)  # (fallbacks, oom_events) once the stage is gone
        self._inject_oom_above = inject_oom_above
        self._background = BackgroundBatches(self._produce, loader.prefetch, device)

    def __iter__(self) -> Iterator[Batch | ShardFailure]:
        return iter(self._background)

    def stop(self) -> None:
        self._background.stop()
        # The decoder and its thread refer to each other; left to the cycle collector, a DALI pipeline
        # can be destroyed inside a process forked later (a DataLoader worker) and hang there.
        if self._stage is not None:
            self._counts = (self._stage.fallbacks, self._stage.oom_events)
        self._stage = None

    def _produce(self, stopped: Callable[[], bool]) -> Iterator[Batch | ShardFailure]:
        normalizer = Normalizer(self.batch_size, self.preprocess, self.device, self.dtype)
        self._stage = stage = _DecodeStage(self.preprocess, self.batch_size, self.device, self.loader,
                                           self._inject_oom_above)
        in_flight: _Checked | None = None
        for item in _checked_batches(self.shards, self.rules, self.batch_size, self.loader.threads, stopped):
            if isinstance(item, ShardFailure):
                yield item
                continue
            # `item` was read and checked while DALI decoded the batch in flight.
            if in_flight is not None:
                yield self._finish(in_flight, normalizer)
            if item.encoded is not None:
                stage.start(item.encoded)
            in_flight = item
        if in_flight is not None:
            yield self._finish(in_flight, normalizer)

    def _finish(self, item: _Checked, normalizer: Normalizer) -> Batch:
        positions = item.positions
        if item.encoded is None:
            crops = torch.empty((0, 3, self.preprocess.crop_size, self.preprocess.crop_size), dtype=torch.uint8,
                                device=self.device)
        else:
            crops, failed = self._stage.finish(item.encoded)
            if failed:
                positions = positions if positions is not None else list(range(len(item.rows)))
                for i in failed:
                    item.rows.mark(positions[i], "decode_error", "corrupt or truncated image data (DALI)")
                bad = set(failed)
                positions = [p for i, p in enumerate(positions) if i not in bad]
        index = None if positions is None else dev.to_device(torch.tensor(positions, dtype=torch.long), self.device)
        images = normalizer.batch(crops, index, rows=len(item.rows))
        return Batch(images, item.rows, dev.record_event(self.device))

    @property
    def fallbacks(self) -> int:
        """Decode batches that failed and were searched in parts for their bad images."""
        return self._stage.fallbacks if self._stage else self._counts[0]

    @property
    def oom_events(self) -> int:
        """Out-of-memory errors while decoding (each retried with memory released)."""
        return self._stage.oom_events if self._stage else self._counts[1]


def _checked_batches(shards: list[Shard], rules: SampleRules, batch_size: int, threads: int,
                     stopped: Callable[[], bool]) -> Iterator[_Checked | ShardFailure]:
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
            yield from _read(shards, progress, rules, batch_size, threads, stopped)
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
            yield from _read(shards[: start + 1], alone, rules, batch_size, threads, stopped)
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


def _read(shards: list[Shard], progress: _Progress, rules: SampleRules, batch_size: int, threads: int,
          stopped: Callable[[], bool]) -> Iterator[_Checked]:
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
        reader = _build_reader(todo, groups, batch_size, threads) if image_exts else None
    except RuntimeError as e:
        raise _failure(e, shards, first) from None
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
            yield _Checked(rows, outputs[0], None)  # every sample decodes: hand DALI its own batch
        else:
            first = n - len(rows)  # rows skipped at the start of this batch
            yield _Checked(rows, [images.array(j) for j in ok] or None, [j - first for j in ok])


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


def _build_reader(shards: list[Shard], groups: list[list[str]], batch_size: int, threads: int):
    """A reader with one output per group of extensions (image, label, kept components; an empty group,
    a label no shard has, gives no output)."""
    from nvidia.dali import fn, pipeline_def, types

    ext = [";".join(group) for group in groups if group]

    @pipeline_def(batch_size=batch_size, num_threads=max(1, threads), device_id=None, prefetch_queue_depth=2)
    def reader():
        outputs = fn.readers.webdataset(
            paths=[s.path for s in shards], index_paths=[s.index_path for s in shards], ext=ext,
            missing_component_behavior="empty", dtypes=[types.UINT8] * len(ext), pad_last_batch=True,
            name="reader")
        return tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)

    pipe = reader()
    pipe.build()
    return pipe


class _DecodeStage:
    """The decode pipeline: encoded images → uint8 crops [n, 3, S, S] on the device, one batch in flight.

    `start` feeds a batch and returns at once; `finish` waits for it. When DALI fails, the pipeline is
    rebuilt (the old one released first) and the same images are decoded again: after an out-of-memory
    error with memory released and in decode batches half the size (regrowing later, as the model's
    micro-batch does); after any other error by decoding it in parts, so an image is `decode_error` only
    when it fails alone.
    """

    def __init__(self, preprocess: Preprocess, batch_size: int, device: torch.device, loader,
                 inject_oom_above: int | None):
        self.preprocess, self.batch_size, self.device, self.loader = preprocess, batch_size, device, loader
        self.policy = MicroBatchPolicy(batch_size, regrow_after=50)
        self.fallbacks = 0
        self.oom_events = 0
        self._inject_oom_above = inject_oom_above
        self._pipe = None
        self._started = False
        self._rebuild()

    def start(self, encoded) -> None:
        if len(encoded) <= self.policy.next_size():  # else `finish` decodes it in smaller batches
            self._run(encoded)
            self._started = True

    def finish(self, encoded) -> tuple[torch.Tensor, list[int]]:
        """(crops of the images that decoded, in order; indices into `encoded` of those that failed alone)."""
        if self._started:
            self._started = False
            try:
                crops = self._outputs(len(encoded))
                self.policy.on_batch_done()
                return crops, []
            except RuntimeError as e:
                try:
                    self._after_error(e, len(encoded))
                except _OutOfMemory:
                    self._shrink(len(encoded))
        results = self._decode_in_batches(list(encoded))
        failed = [i for i, r in enumerate(results) if r is None]
        good = [r for r in results if r is not None]
        if failed:
            self.fallbacks += 1
        self.policy.on_batch_done()
        if not good:
            return torch.empty((0, 3, self.preprocess.crop_size, self.preprocess.crop_size), dtype=torch.uint8,
                               device=self.device), failed
        return torch.cat(good), failed

    def _decode_in_batches(self, items: list) -> list[torch.Tensor | None]:
        """Per item its crop [1, 3, S, S], or None when it fails alone; decode batches shrink on OOM."""
        results: list[torch.Tensor | None] = []
        start = 0
        while start < len(items):
            size = self.policy.next_size()
            chunk = items[start : start + size]
            try:
                results += self._search(chunk)
            except _OutOfMemory:
                self._shrink(len(chunk))
                continue
            start += len(chunk)
        return results

    def _shrink(self, size: int) -> None:
        """Halve the decode batch after an out-of-memory error at `size` images; at one image, give up."""
        try:
            self.policy.on_oom(size)
        except OutOfMemoryAtOneRow:
            raise OutOfMemoryAtOneRow(f"out of memory decoding a single image on {self.device}") from None

    def _search(self, items: list) -> list[torch.Tensor | None]:
        """Decode `items`; if that fails, decode them in √n groups and search the groups that fail. One
        bad image in 256 costs about twice the batch's decoding and three failed runs (halving would
        cost three times the decoding and eight failed runs, each followed by a pipeline rebuild)."""
        try:
            self._run(items)
            return list(self._outputs(len(items)).split(1))
        except RuntimeError as e:
            self._after_error(e, len(items))
        if len(items) == 1:
            return [None]
        size = math.isqrt(len(items))  # < len(items) from 2 on
        return [crop for start in range(0, len(items), size) for crop in self._search(items[start : start + size])]

    def _run(self, encoded) -> None:
        self._pipe.feed_input("encoded", encoded)
        self._pipe.schedule_run()

    def _outputs(self, count: int) -> torch.Tensor:
        (out,) = self._pipe.outputs()
        if self._inject_oom_above is not None and count > self._inject_oom_above:
            raise torch.OutOfMemoryError(f"out of memory (injected: decoding {count} images > "
                                         f"oom.inject_decode_above={self._inject_oom_above})")
        return to_torch(out.as_tensor(), self.device).permute(0, 3, 1, 2)

    def _after_error(self, error: RuntimeError, count: int) -> None:
        """Rebuild the pipeline; raise _OutOfMemory if the error was one, so the caller retries smaller."""
        log.debug("DALI decode of %d images failed: %s", count, one_line(error))
        oom = is_oom(error) or any(m in str(error) for m in DALI_OOM_MESSAGES)
        self._rebuild(release_memory=oom)
        if oom:
            self.oom_events += 1
            log.warning("out of memory decoding %d images on %s; memory released, retrying them", count, self.device)
            raise _OutOfMemory() from None
        if count > 1:
            log.warning("DALI failed to decode a batch of %d images; decoding it in parts to find the bad ones", count)

    def _rebuild(self, release_memory: bool = False) -> None:
        """A failed DALI pipeline is not reusable: drop it (and its decoder buffers; after an out-of-memory
        error also what torch's and DALI's allocators cache) before building a new one."""
        self._pipe = None
        if release_memory:
            dev.release_memory(self.device)
        self._pipe = _build_decode_pipeline(self.preprocess, self.batch_size, self.device, self.loader)


DALI_OOM_MESSAGES = ("CUDA allocation failed", "bad_alloc", "cudaErrorMemoryAllocation", "out of memory")


class _OutOfMemory(Exception):
    pass


def _build_decode_pipeline(p: Preprocess, batch_size: int, device: torch.device, loader):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    d = loader.dali
    # Options of the GPU decoder only; DALI ignores them on the CPU (see conf/config.yaml loader.dali).
    gpu_options = dict(hw_decoder_load=d.hw_decoder_load, jpeg_fancy_upsampling=True,
                       preallocate_width_hint=d.preallocate_width_hint,
                       preallocate_height_hint=d.preallocate_height_hint,
                       device_memory_padding=d.device_memory_padding,
                       host_memory_padding=d.host_memory_padding) if gpu else {}

    @pipeline_def(batch_size=batch_size, num_threads=max(1, loader.threads),
                  device_id=(device.index or 0) if gpu else None, prefetch_queue_depth=1)
    def decode():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB, **gpu_options)
        return fn.resize_crop_mirror(images, resize_shorter=p.resize_size, crop=(p.crop_size, p.crop_size),
                                     antialias=True, interp_type=getattr(types, INTERP[p.interpolation]))

    pipe = decode()
    pipe.build()
    return pipe


def to_torch(tensor, device: torch.device) -> torch.Tensor:
    """A DALI dense tensor as a torch tensor on `device`, without a host round-trip on CUDA. On the CPU
    it is a view of DALI's buffer, valid until the pipeline runs again: copy it before that."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        result = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(device))
        return result
    return torch.from_dlpack(tensor)
