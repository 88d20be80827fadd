"""NVIDIA DALI back-end: `fn.readers.webdataset` reads the shards, `fn.decoders.image` decodes.

Two pipelines. One reader streams every shard of this rank in order, as raw bytes, and Python checks
each sample's header in place (`dali_read`); the good ones go to the decode pipeline (`dali_decode`),
which decodes, resizes and crops while Python reads and checks the next batch. Device `mixed` (nvJPEG,
output stays on the GPU) on CUDA, `cpu` otherwise: the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from pipeline import device as dev
from pipeline.batch import Batch, ShardFailure
from pipeline.decode.assemble import BackgroundBatches, Normalizer, Preprocess
from pipeline.decode.dali_decode import DecodeStage
from pipeline.decode.dali_read import Checked, checked_batches
from pipeline.decode.samples import SampleRules
from pipeline.shards import Shard


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


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
        self._stage: DecodeStage | None = None
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
        self._stage = stage = DecodeStage(self.preprocess, self.batch_size, self.device, self.loader,
                                           self._inject_oom_above)
        in_flight: Checked | None = None
        for item in checked_batches(self.shards, self.rules, self.batch_size, self.loader.threads, stopped):
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

    def _finish(self, item: Checked, normalizer: Normalizer) -> Batch:
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


