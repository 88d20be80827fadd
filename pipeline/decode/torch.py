"""torch back-end: `webdataset`'s tar reader + `torchvision.io.decode_image` + `transforms.v2`,
in DataLoader workers. Also the path for .tar.gz shards and machines without DALI.

Each worker reads whole shards (so a shard's rows keep their order) and sends chunks of rows with
their uint8 crops; normalisation happens on the scoring device in the shared BatchAssembler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F
from webdataset.tariterators import tar_file_iterator

from pipeline.batch import OK, Batch, Row, ShardFailure
from pipeline.decode.assemble import BackgroundBatches, BatchAssembler, Preprocess
from pipeline.decode.samples import SampleRules, make_row, one_line
from pipeline.shards import Shard

log = logging.getLogger(__name__)

CHUNK_ROWS = 32
INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
          "nearest": InterpolationMode.NEAREST}


class TorchDecoder:
    """Yields fixed-size Batches (and ShardFailures) for `shards`."""

    def __init__(self, shards: list[Shard], rules: SampleRules, preprocess: Preprocess, batch_size: int,
                 device: torch.device, dtype: torch.dtype, threads: int, prefetch: int):
        self.dataset = ShardSamples(shards, rules, preprocess)
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.device = device
        self.dtype = dtype
        self.workers = min(threads, len(shards))
        self.prefetch = prefetch
        self._background = BackgroundBatches(self._produce, prefetch)

    def __iter__(self) -> Iterator[Batch | ShardFailure]:
        return iter(self._background)

    def stop(self) -> None:
        self._background.stop()

    def _produce(self, stopped: Callable[[], bool]) -> Iterator[Batch | ShardFailure]:
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            prefetch_factor=self.prefetch if self.workers else None,
                            pin_memory=self.device.type == "cuda")
        assembler = BatchAssembler(self.batch_size, self.preprocess, self.device, self.dtype)
        for item in loader:
            if stopped():
                return
            if isinstance(item, ShardFailure):
                yield item
                continue
            rows, positions, crops = item
            images: list[torch.Tensor | None] = [None] * len(rows)
            for position, crop in zip(positions, crops):
                images[position] = crop
            yield from assembler.add(rows, images)
        yield from assembler.flush()


class ShardSamples(IterableDataset):
    """Chunks of (rows, positions of decoded rows, uint8 crops [n, 3, S, S]) per shard; worker i reads
    shards i, i+W, …; a shard that cannot be read to its end yields a ShardFailure."""

    def __init__(self, shards: list[Shard], rules: SampleRules, preprocess: Preprocess):
        self.shards = shards
        self.rules = rules
        self.preprocess = preprocess

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for shard in self.shards[worker::workers]:
            yield from self._chunks(shard)

    def _chunks(self, shard: Shard):
        rows, positions, crops = [], [], []
        seen: set[str] = set()
        produced = 0
        try:
            with open(shard.path, "rb") as stream:
                for key, components in group_by_key(tar_file_iterator(stream, skip_meta=None)):
                    row, crop = self._sample(shard, key, components, seen)
                    if crop is not None:
                        positions.append(len(rows))
                        crops.append(crop)
                    rows.append(row)
                    produced += 1
                    if len(rows) == CHUNK_ROWS:
                        yield rows, positions, _stack(crops, self.preprocess.crop_size)
                        rows, positions, crops = [], [], []
            if produced != shard.count:  # tarfile ends quietly at a damaged header
                raise OSError(f"tar ended after {produced} of the {shard.count} samples its index lists")
        except Exception as e:  # a truncated or unreadable tar: the whole shard is failed
            log.error("shard failed shard=%s reason=%s", shard.path, one_line(e))
            yield ShardFailure(shard.name, one_line(e))
            return
        if rows:
            yield rows, positions, _stack(crops, self.preprocess.crop_size)

    def _sample(self, shard: Shard, key: str, components: dict[str, bytes], seen: set[str]):
        image = next((data for ext, data in components.items() if self.rules.is_image(ext)), None)
        label = next((data for ext, data in components.items() if self.rules.is_label(ext)), None)
        row = make_row(key, shard.name, image, label, self.rules, seen)
        if row.status != OK:
            return row, None
        try:
            return row, self._transform(image)
        except Exception as e:  # torchvision's message starts with its source location: keep the reason
            reason = one_line(e).rsplit(", ", 1)[-1]
            return replace(row, status="decode_error", error=f"corrupt or truncated image data (torchvision: {reason})"), None

    def _transform(self, data: bytes) -> torch.Tensor:
        p = self.preprocess
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
            image = F.to_dtype(image, torch.uint8, scale=True)
        height, width = p.resized_shape(*image.shape[-2:])
        image = F.resize(image, [height, width], interpolation=INTERP[p.interpolation], antialias=True)
        top, left = p.crop_origin(height, width)
        return F.crop(image, top, left, p.crop_size, p.crop_size)


def group_by_key(files: Iterator[dict]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive files with the same key form one sample: the rule DALI's index files follow."""
    key, components = None, {}
    for f in files:
        name = f["fname"]
        dot = name.find(".", name.rfind("/") + 1)
        base, ext = name[:dot], name[dot + 1 :]  # exactly as wds2idx splits, even without a dot
        if not base or base.endswith("/"):
            continue
        if base != key:
            if key is not None:
                yield key, components
            key, components = base, {}
        components.setdefault(ext, f["data"])
    if key is not None:
        yield key, components


def _stack(crops: list[torch.Tensor], size: int) -> torch.Tensor:
    return torch.stack(crops) if crops else torch.empty((0, 3, size, size), dtype=torch.uint8)
