"""torch back-end: `torchvision.io.decode_image` + `transforms.v2` in DataLoader workers. Also the
path for .tar.gz shards and machines without DALI.

A local plain tar is read as DALI reads it: by its index file, each component a view of the
memory-mapped shard, with no tar parsing per sample. Compressed tars, which have no random access, and
remote ones (s3:// and other fsspec URLs, `pipe:`, https://) are streamed with webdataset's tar reader. Each worker reads whole shards (so a shard's rows keep their order) and
sends chunks of rows as columns with their uint8 crops in one tensor; normalisation happens on the
scoring device, in the same code the DALI back-end uses.
"""

from __future__ import annotations

import gc
import logging
import mmap
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from webdataset.tariterators import tar_file_iterator

from pipeline.batch import OK, Batch, Rows, ShardFailure
from pipeline.decode.assemble import BackgroundBatches, BatchAssembler, Normalizer, Preprocess, resize_and_crop
from pipeline.decode.samples import SampleRules, add_kept, one_line, parse_label, sample_status
from pipeline.layout import open_input
from pipeline.shard_index import group_by_key, read_index
from pipeline.shards import Shard

log = logging.getLogger(__name__)

CHUNK_ROWS = 256


class TorchDecoder:
    """Yields fixed-size Batches (and ShardFailures) for `shards`."""

    fallbacks = 0  # each image is decoded on its own here: a bad one never costs a batch
    oom_events = 0
    reference_decodes = 0

    def __init__(self, shards: list[Shard], rules: SampleRules, preprocesses: list[Preprocess], batch_size: int,
                 device: torch.device, dtype: torch.dtype, loader):
        self.dataset = ShardSamples(shards, rules, preprocesses)
        self.normalizers = [Normalizer(batch_size, p, device, dtype) for p in preprocesses]
        self.workers = min(loader.threads, len(shards))
        self.prefetch = loader.prefetch
        self.pin = device.type == "cuda"
        self._background = BackgroundBatches(self._produce, loader.prefetch, device)

    def __iter__(self) -> Iterator[Batch | ShardFailure]:
        return iter(self._background)

    def stop(self) -> None:
        self._background.stop()

    def _produce(self, stopped: Callable[[], bool]) -> Iterator[Batch | ShardFailure]:
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            prefetch_factor=self.prefetch if self.workers else None, pin_memory=self.pin)
        assembler = BatchAssembler(self.normalizers)
        # The workers are forked; a garbage collection in one of them would write to every Python object it
        # inherited and so copy them all (~200 MB per worker). Frozen objects are never traversed.
        gc.freeze()
        try:
            items = iter(loader)  # starts the workers
        finally:
            gc.unfreeze()
        for item in items:
            if stopped():
                return
            if isinstance(item, ShardFailure):
                yield item
                continue
            rows, crops = item
            yield from assembler.add(rows, crops)
        yield from assembler.flush()


class ShardSamples(IterableDataset):
    """Chunks of up to CHUNK_ROWS rows, in order, with their uint8 crops, one [n, 3, S, S] tensor per
    branch (zeros where a row is not ok): each image decoded once, then resized and cropped per branch.
    Worker i reads shards i, i+W, …; a shard that cannot be read to its end yields a ShardFailure."""

    def __init__(self, shards: list[Shard], rules: SampleRules, preprocesses: list[Preprocess]):
        self.shards = shards
        self.rules = rules
        self.preprocesses = preprocesses
        # never scored
        self._placeholder = tuple(torch.zeros((3, p.crop_size, p.crop_size), dtype=torch.uint8) for p in preprocesses)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rows, crops = Rows(), []
        for shard in self.shards[worker::workers]:
            start, seen, produced = len(rows), set(), 0  # start: where this shard's rows begin in the chunk
            try:
                for key, components in samples_of(shard):
                    crops.append(self._sample(shard, key, components, seen, rows))
                    produced += 1
                    if len(rows) == CHUNK_ROWS:
                        yield rows, _stack(crops)
                        rows, crops, start = Rows(), [], 0
                if produced != shard.count:  # tarfile ends quietly at a damaged header
                    raise OSError(f"tar ended after {produced} of the {shard.count} samples its index lists")
            except Exception as e:  # a truncated or unreadable tar: the whole shard is failed
                log.error("shard failed shard=%s reason=%s", shard.path, one_line(e))
                rows, crops = rows.slice(0, start), crops[:start]  # rows already sent: the writer drops them
                yield ShardFailure(shard.name, one_line(e))
        if rows:
            yield rows, _stack(crops)

    def _sample(self, shard: Shard, key: str, components: dict, seen: set[str], rows: Rows) -> tuple:
        """Appends the sample's row; returns its uint8 crop per branch, or placeholders when it is not ok."""
        rules = self.rules
        image_ext, label_ext = rules.image_of(components), rules.label_of(components)
        image = components[image_ext] if image_ext is not None else None
        status, error = sample_status(key, image, rules, seen)
        crop = self._placeholder
        if status == OK:
            try:
                crop = decode_and_crop(image, self.preprocesses)
            except Exception as e:  # torchvision's message starts with its source location: keep the reason
                reason = one_line(e).rsplit(", ", 1)[-1]
                status, error = "decode_error", f"corrupt or truncated image data (torchvision: {reason})"
        rows.keys.append(key)
        rows.shards.append(shard.name)
        rows.labels.append(parse_label(components[label_ext]) if label_ext is not None else None)
        rows.status.append(status)
        rows.errors.append(error)
        for name in rules.keep:
            ext = rules.kept_of(name, components)
            add_kept(rows, name, components[ext] if ext is not None else None)
        return crop


def _stack(crops: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Per branch, [n, 3, S, S] with channels_last strides: the batch tensor's layout, laid out here in the
    worker, so that normalising on the device is a plain cast and multiply-add."""
    return tuple(torch.stack([c.permute(1, 2, 0) for c in branch]).permute(0, 3, 1, 2) for branch in zip(*crops))


def decode_and_crop(data, preprocesses: list[Preprocess]) -> tuple[torch.Tensor, ...]:
    """An encoded image, decoded once → its uint8 crop [3, S, S] per preprocessing: torchvision's decoder,
    resized and cropped with the geometry both back-ends share. Raises what the decoder raises for bad data."""
    encoded = torch.frombuffer(data if isinstance(data, memoryview) else bytearray(data), dtype=torch.uint8)
    # Orientation as cameras intend, as DALI's decoder applies it.
    image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        image = (image.to(torch.int32) >> 8).to(torch.uint8)  # as torchvision's to_dtype(…, scale=True)
    return tuple(resize_and_crop(image, p) for p in preprocesses)


def samples_of(shard: Shard) -> Iterator[tuple[str, dict]]:
    """(key, {extension: data}) for every sample, in tar order. For a local plain tar, data are writable
    views of a private memory map (copy-on-write, never written); for a compressed or remote one, bytes
    streamed by webdataset's tar reader."""
    if not shard.is_plain_tar or shard.is_remote:
        with open_input(shard.path) as stream:
            yield from streamed_samples(tar_file_iterator(stream, skip_meta=None))
        return
    index = read_index(shard.index_path, spans=True)
    with open(shard.path, "rb") as f:
        # Unmapped when the last view of it is gone (views may outlive this generator).
        data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
    for key, extensions, spans in zip(index.keys, index.extensions, index.spans):
        components = {}
        for ext, (offset, size) in zip(extensions, spans):
            components.setdefault(ext, data[offset : offset + size])
        yield key, components


def streamed_samples(files: Iterator[dict]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """webdataset's tar reader's files as samples, grouped by the rule the index files follow."""
    for key, parts in group_by_key((f["fname"], f["data"]) for f in files):
        components = {}
        for ext, data in parts:
            components.setdefault(ext, data)
        yield key, components
