"""Turn a stream of (row, image) pairs into fixed-size Batches, and run that work in the background.

Both back-ends end here, so padding, placeholders, normalisation and the device copy are the same
code whichever decoder produced the pixels.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from pipeline.batch import Batch, Row, ShardFailure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, center-crop a square, normalise: parameters from the model config."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    # The geometry is DALI's (round the long side, round the crop origin half up), written out so the
    # torch back-end and the tests' reference put every pixel in the same place.
    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        scale = self.resize_size / min(height, width)
        if height <= width:
            return self.resize_size, max(self.resize_size, round(width * scale))
        return max(self.resize_size, round(height * scale)), self.resize_size

    def crop_origin(self, height: int, width: int) -> tuple[int, int]:
        return (math.floor((height - self.crop_size) / 2 + 0.5), math.floor((width - self.crop_size) / 2 + 0.5))


class BatchAssembler:
    """Collects rows with their images (None for error rows) and emits Batches of exactly `batch_size`.

    Images arrive either as uint8 [3, H, W] (normalised here, on the device) or already normalised
    floating point; placeholders are zeros, i.e. the mean colour after normalisation.
    """

    def __init__(self, batch_size: int, preprocess: Preprocess, device: torch.device, dtype: torch.dtype):
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.size = preprocess.crop_size
        self.mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1) * 255
        self.pending: list[tuple[Row, torch.Tensor | None]] = []

    def add(self, rows: list[Row], images: list[torch.Tensor | None]) -> Iterator[Batch]:
        self.pending.extend(zip(rows, images))
        while len(self.pending) >= self.batch_size:
            chunk, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
            yield self._make(chunk)

    def flush(self) -> Iterator[Batch]:
        """The padded tail batch, if any rows are left."""
        if self.pending:
            chunk, self.pending = self.pending, []
            yield self._make(chunk)

    def _make(self, chunk: list[tuple[Row, torch.Tensor | None]]) -> Batch:
        shape = (self.batch_size, 3, self.size, self.size)
        images = torch.zeros(shape, dtype=self.dtype, device=self.device).contiguous(memory_format=torch.channels_last)
        present = [(i, img) for i, (_, img) in enumerate(chunk) if img is not None]
        if present:
            index = torch.tensor([i for i, _ in present], device=self.device)
            stacked = torch.stack([img for _, img in present])
            if self.device.type == "cuda" and stacked.device.type == "cpu":
                stacked = stacked.pin_memory()
            stacked = stacked.to(self.device, non_blocking=True)
            if stacked.dtype == torch.uint8:
                stacked = (stacked.float() - self.mean) / self.std
            images.index_copy_(0, index, stacked.to(self.dtype))
        return Batch(images=images, rows=[row for row, _ in chunk])


_DONE = object()


class BackgroundBatches:
    """Runs `produce()` in a thread, `depth` items ahead of the consumer; errors re-raise in the consumer.

    Decoding (DALI threads or DataLoader workers, plus the assembly above) then overlaps with the model
    running in the main thread.
    """

    def __init__(self, produce: Callable[[Callable[[], bool]], Iterator[Batch | ShardFailure]], depth: int):
        self._produce = produce
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardscore-decode", daemon=True)

    def __iter__(self) -> Iterator[Batch | ShardFailure]:
        self._thread.start()
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        """Stop reading new input; what was already produced is dropped."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()

    def _run(self) -> None:
        try:
            for item in self._produce(self._stop.is_set):
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e)
            return
        self._put(_DONE)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
