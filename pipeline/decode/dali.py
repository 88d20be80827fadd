"""NVIDIA DALI back-end: `fn.readers.webdataset` reads the shards, `fn.decoders.image` decodes.

Two pipelines. A reader streams this rank's shards in order, a window of shards at a time, as raw bytes,
and Python checks each sample's header in place (`dali_read`); the good ones go to the decode pipeline
(`dali_decode`), which decodes, resizes, crops and normalises two batches at a time while Python reads and
checks the next. Device `mixed` (nvJPEG, output stays on the GPU) on CUDA, `cpu` otherwise: the same code.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch

from pipeline import device as dev

from pipeline.batch import Batch, Rows, ShardFailure
from pipeline.decode.assemble import BackgroundBatches, DecodedAssembler, Normalizer, Preprocess
from pipeline.decode.dali_decode import DecodeStage
from pipeline.decode.dali_read import WINDOW_DONE, Checked, checked_batches, shut_down
from pipeline.decode.samples import SampleRules
from pipeline.shards import Shard

IN_FLIGHT = 2  # decode batches in DALI at once: the next one's host work overlaps this one's device work

def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliDecoder:
    """Yields fixed-size Batches (and ShardFailures) for `shards`, in shard order."""

    def __init__(self, shards: list[Shard], rules: SampleRules, preprocesses: list[Preprocess], batch_size: int,
                 device: torch.device, dtype: torch.dtype, loader, oom, stager=None):
        self.shards = shards
        self.stager = stager
        self.rules = rules
        self.preprocesses = preprocesses
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.loader = loader
        self.oom = oom
        self._stage: DecodeStage | None = None
        self._counts = {"fallbacks": 0, "oom_events": 0, "reference_decodes": 0}  # once the stage is gone
        self._background = BackgroundBatches(self._produce, loader.prefetch, device)

    def __iter__(self) -> Iterator[Batch | ShardFailure]:
        return iter(self._background)

    def stop(self) -> None:
        self._background.stop()  # the producer thread has closed the stage's pipelines when this returns
        if self._stage is not None:
            self._counts = {name: getattr(self._stage, name) for name in self._counts}
        self._stage = None

    def _produce(self, stopped: Callable[[], bool]) -> Iterator[Batch | ShardFailure]:
        assembler = DecodedAssembler([Normalizer(self.batch_size, p, self.device, self.dtype)
                                      for p in self.preprocesses])
        self._stage = stage = DecodeStage(self.preprocesses, self.batch_size, self.device, self.dtype, self.loader,
                                          self.oom)
        in_flight: deque[Checked] = deque()
        retired: list = []  # readers done with their window, shut down once none of their batches is in flight
        try:
            for item in checked_batches(self.shards, self.rules, self.batch_size, self.loader, stopped, retired,
                                        self.stager):
                if isinstance(item, ShardFailure):
                    yield item
                    continue
                if item is WINDOW_DONE:
                    while in_flight:
                        yield from assembler.add(*self._finish(in_flight.popleft()))
                    _shut_down_unused(retired, in_flight)
                    dev.trim_host_memory()
                    continue
                # `item` was read and checked while DALI decoded the batches in flight.
                if item.encoded is not None:
                    item.token = stage.start(item.encoded)
                in_flight.append(item)
                if len(in_flight) == IN_FLIGHT:
                    yield from assembler.add(*self._finish(in_flight.popleft()))
                    _shut_down_unused(retired, in_flight)
            while in_flight:
                yield from assembler.add(*self._finish(in_flight.popleft()))
            yield from assembler.flush()
        finally:
            _shut_down_unused(retired, ())
            stage.close()

    def _finish(self, item: Checked) -> tuple[Rows, tuple | None, list[int] | None]:
        """The item's rows, its decoded views (one per branch) and the rows they belong to (None: all)."""
        if item.encoded is None:
            return item.rows, None, []
        images, failed = self._stage.finish(item.token, item.encoded)
        positions = item.positions
        if failed:
            positions = positions if positions is not None else list(range(len(item.rows)))
            for i in failed:
                item.rows.mark(positions[i], "decode_error",
                               "corrupt image data (DALI's CPU decoder and torchvision fail on it)")
            bad = set(failed)
            positions = [p for i, p in enumerate(positions) if i not in bad]
        return item.rows, images, positions

    def _count(self, name: str) -> int:
        return getattr(self._stage, name) if self._stage else self._counts[name]

    @property
    def fallbacks(self) -> int:
        """Decode batches that failed on something other than memory, their images judged one by one."""
        return self._count("fallbacks")

    @property
    def oom_events(self) -> int:
        """Out-of-memory errors while decoding (each retried with memory released)."""
        return self._count("oom_events")

    @property
    def reference_decodes(self) -> int:
        """Images the main decoder failed on and the reference decoded (DALI's CPU decoder, else torchvision),
        used in their place."""
        return self._count("reference_decodes")


def _shut_down_unused(retired: list, in_flight) -> None:
    for reader in list(retired):
        if all(item.source is not reader for item in in_flight):
            shut_down(reader)
            retired.remove(reader)
