"""What both back-ends share after decoding: the preprocessing geometry, normalisation into fixed-size
batch tensors on the scoring device, and the background thread that produces batches.

Normalisation, placeholders and padding are the same code whichever decoder produced the pixels, so
the same uint8 crop gives the same model input in both.
"""

from __future__ import annotations

import bisect
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from pipeline import device as dev
from pipeline.batch import Batch, Rows, ShardFailure


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


def resize_and_crop(image: torch.Tensor, p: Preprocess) -> torch.Tensor:
    """uint8 [3, H, W] (or a batch of same-size images [n, 3, H, W]) → its shorter side resized (antialiased,
    torch's uint8 kernels: fastest on channels_last strides, e.g. a CHW view of HWC pixels) and the center
    crop [..., 3, S, S]: what both back-ends do on the CPU."""
    height, width = p.resized_shape(*image.shape[-2:])
    if (height, width) != tuple(image.shape[-2:]):
        # One image as a batch of one whose strides still read as channels_last (`unsqueeze(0)`'s do not):
        # torch then writes the output channels_last too, not planar, 2× faster with the copy that follows.
        batch = image if image.dim() == 4 else image.as_strided((1, *image.shape), (image.numel(), *image.stride()))
        batch = torch.nn.functional.interpolate(batch, size=(height, width), mode=p.interpolation, antialias=True,
                                                align_corners=False)
        image = batch if image.dim() == 4 else batch[0]
    top, left = p.crop_origin(height, width)
    return image[..., top : top + p.crop_size, left : left + p.crop_size]


class BatchBuffers:
    """Batch tensors of one shape, on the CPU taken again from the few kept once nothing refers to one any
    more (no tensor, view or output of a model), else new. torch keeps no cache of host memory: a fresh
    77 MB batch (128 × 224² float32) is ~19,000 page faults, 0.4 ms of kernel time per image here
    (docs/BENCHMARKS.md). On CUDA, torch's caching allocator already does this."""

    KEEP = 8  # more than can be in flight: the decode queue, the batch being scored and the one being written

    def __init__(self, shape: tuple, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self._kept: list[torch.Tensor] = []
        self._reuse = device.type == "cpu" and hasattr(torch._C, "_storage_Use_Count")

    def take(self) -> torch.Tensor:
        """A batch tensor: an alias of a kept one that nothing else uses, else a new one. Users only ever
        hold aliases (and views of them), each of which counts as a user of the kept tensor's memory."""
        for kept in self._kept:
            # Its memory used by the kept tensor and the check's own storage object only: no alias or view lives.
            if torch._C._storage_Use_Count(kept.untyped_storage()._cdata) == 2:
                return kept.detach()
        tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device, memory_format=torch.channels_last)
        if not self._reuse or len(self._kept) >= self.KEEP:
            return tensor
        self._kept.append(tensor)
        return tensor.detach()


class Normalizer:
    """uint8 crops → the model's input: (x - mean) / std in the model dtype, written into a batch tensor
    of exactly `batch_size` rows (channels_last). Placeholder and padding rows are zeros. (`place` takes
    images DALI has normalised already.)"""

    def __init__(self, batch_size: int, preprocess: Preprocess, device: torch.device, dtype: torch.dtype):
        self.batch_size, self.size, self.device, self.dtype = batch_size, preprocess.crop_size, device, dtype
        mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1) * 255
        self.scale, self.shift = 1 / std, -mean / std  # (x - mean) / std as one multiply-add
        # The same per pixel row of a channels_last image (R G B R G B …): broadcast over a [3] innermost dim
        # cannot vectorise, over a [3·S] one it does (5× faster here, docs/BENCHMARKS.md).
        self._scale_row = self.scale.view(3).repeat(self.size)
        self._shift_row = self.shift.view(3).repeat(self.size)
        self._buffers = BatchBuffers((batch_size, 3, self.size, self.size), dtype, device)

    def batch(self, crops: torch.Tensor, positions: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
        """A new batch tensor holding `crops` (uint8 [n, 3, S, S], any memory format, on the device) at
        `positions` (None: rows 0…n-1). `rows` is how many rows are real; the rest are zeros."""
        images = self._buffers.take()
        n = crops.shape[0] if rows is None else rows
        if positions is None:
            self._normalize(crops, images[: crops.shape[0]])
            images[crops.shape[0]:].zero_()
            return images
        images.zero_()
        if crops.shape[0]:
            target = torch.empty((crops.shape[0], 3, self.size, self.size), dtype=self.dtype, device=self.device,
                                 memory_format=torch.channels_last)
            self._normalize(crops, target)
            images[:n].index_copy_(0, positions, target)
        return images

    def place(self, images: torch.Tensor | None, positions: torch.Tensor | None, rows: int) -> torch.Tensor:
        """A batch tensor holding DALI's images (NHWC [n, S, S, 3]: uint8 crops, normalised here, or already
        normalised) at `positions` (None: rows 0…n-1); the other rows are zeros. A full batch already in
        the model's dtype is used as it is (no copy)."""
        if images is not None and images.dtype == torch.uint8:
            return self.batch(images.permute(0, 3, 1, 2), positions, rows)
        nchw = None if images is None else images.permute(0, 3, 1, 2)  # channels_last strides, no copy
        n = 0 if nchw is None else nchw.shape[0]
        if positions is None and n == self.batch_size and nchw.dtype == self.dtype:
            return nchw
        batch = torch.empty((self.batch_size, 3, self.size, self.size), dtype=self.dtype, device=self.device,
                            memory_format=torch.channels_last)
        if positions is None:
            if n:
                batch[:n].copy_(nchw)
            batch[n:].zero_()
            return batch
        batch.zero_()
        if n:
            batch[:rows].index_copy_(0, positions, nchw.to(self.dtype))
        return batch

    def _normalize(self, crops: torch.Tensor, out: torch.Tensor) -> None:
        """`out` (channels_last, the model's dtype) = (crops - mean) / std: the uint8 crops cast into `out`
        (exact: 0…255 are integers in bf16 and fp16 too), then one multiply-add along each pixel row, in
        place, computed in float32 and rounded once, as before."""
        out.copy_(crops)
        rows = out.permute(0, 2, 3, 1).view(-1, self.size * 3)  # channels_last: a view, never a copy
        torch.addcmul(self._shift_row, rows, self._scale_row, out=rows)


class BatchAssembler:
    """Fills fixed-size batches from chunks of rows with their uint8 crops, one tensor per branch
    ([n, 3, S, S], zeros for rows that are not ok), as the torch back-end's workers send them."""

    def __init__(self, normalizers: list[Normalizer]):
        self.normalizers = normalizers
        self.batch_size = normalizers[0].batch_size
        self._rows = Rows()
        self._crops: list[tuple[torch.Tensor, ...]] = []
        self._count = 0

    def add(self, rows: Rows, crops: tuple[torch.Tensor, ...]) -> Iterator[Batch]:
        start = 0
        while start < len(rows):
            take = min(self.batch_size - self._count, len(rows) - start)
            self._rows.extend(rows.slice(start, start + take))
            self._crops.append(tuple(c[start : start + take] for c in crops))
            self._count += take
            start += take
            if self._count == self.batch_size:
                yield self._make()

    def flush(self) -> Iterator[Batch]:
        """The padded tail batch, if any rows are left."""
        if self._count:
            yield self._make()

    def _make(self) -> Batch:
        device = self.normalizers[0].device
        views = []
        for branch, normalizer in enumerate(self.normalizers):
            parts = [crops[branch] for crops in self._crops]
            crops = parts[0] if len(parts) == 1 else torch.cat(parts)
            views.append(normalizer.batch(dev.to_device(crops, device)))
        batch = Batch(tuple(views), self._rows, dev.record_event(device))
        self._rows, self._crops, self._count = Rows(), [], 0
        return batch


class DecodedAssembler:
    """Fills fixed-size batches from pieces of rows with their images already decoded (a tuple of NHWC
    tensors, one per branch, for the rows at `positions`, None: all rows), as DALI's decode batches give
    them. A piece that fills a batch alone becomes it directly; shorter ones (the last reader batch of a
    window of shards) are stitched with the next, so padding is only ever at the end of the run."""

    def __init__(self, normalizers: list[Normalizer]):
        self.normalizers = normalizers
        self.batch_size = normalizers[0].batch_size
        self._pieces: list[tuple[Rows, tuple | None, list[int] | None]] = []
        self._count = 0

    def add(self, rows: Rows, images: tuple | None, positions: list[int] | None) -> Iterator[Batch]:
        if not self._pieces and len(rows) == self.batch_size:
            yield self._batch([(rows, images, positions)])
            return
        while len(rows):
            take = min(self.batch_size - self._count, len(rows))
            head, (rows, images, positions) = _split(rows, images, positions, take)
            self._pieces.append(head)
            self._count += take
            if self._count == self.batch_size:
                yield self._batch(self._pieces)
                self._pieces, self._count = [], 0

    def flush(self) -> Iterator[Batch]:
        """The padded tail batch, if any rows are left."""
        if self._pieces:
            yield self._batch(self._pieces)
            self._pieces, self._count = [], 0

    def _batch(self, pieces) -> Batch:
        device = self.normalizers[0].device
        if len(pieces) == 1:
            rows, images, positions = pieces[0]
            index = None if positions is None else dev.to_device(torch.tensor(positions, dtype=torch.long), device)
            views = [n.place(None if images is None else images[b], index, len(rows))
                     for b, n in enumerate(self.normalizers)]
        else:
            # Pieces without positions have every row's image, in order: normalised straight in, no scatter.
            scatter = any(positions is not None for _, _, positions in pieces)
            rows, kept, where, offset = Rows(), [], [], 0
            for piece_rows, images, positions in pieces:
                rows.extend(piece_rows)
                if images is not None and images[0].shape[0]:
                    kept.append(images)
                    if scatter:
                        where += [offset + p for p in (positions if positions is not None else range(len(piece_rows)))]
                offset += len(piece_rows)
            index = dev.to_device(torch.tensor(where, dtype=torch.long), device) if scatter else None
            views = [n.place(torch.cat([k[b] for k in kept]) if kept else None, index, len(rows))
                     for b, n in enumerate(self.normalizers)]
        return Batch(tuple(views), rows, dev.record_event(device))


def _split(rows: Rows, images, positions, k: int):
    """(the first k rows of a piece, the rest), each with its images (per branch) and positions."""
    if k == len(rows):
        return (rows, images, positions), (Rows(), None, None)
    if positions is None:  # kept None: a batch stitched from such pieces needs no scatter by positions
        return ((rows.slice(0, k), tuple(v[:k] for v in images), None),
                (rows.slice(k, len(rows)), tuple(v[k:] for v in images), None))
    m = bisect.bisect_left(positions, k)
    head = (rows.slice(0, k), None if images is None else tuple(v[:m] for v in images), positions[:m])
    tail = (rows.slice(k, len(rows)), None if images is None else tuple(v[m:] for v in images),
            [p - k for p in positions[m:]])
    return head, tail


_DONE = object()


class BackgroundBatches:
    """Runs `produce()` in a thread, `depth` items ahead of the consumer; errors re-raise in the consumer.

    Decoding (DALI threads or DataLoader workers, plus normalisation) then overlaps with the model in the
    main thread. On CUDA the thread queues its work on a stream of its own, and each Batch carries the
    event the consumer waits on, so decoding never waits for the model's work in flight.
    """

    def __init__(self, produce: Callable[[Callable[[], bool]], Iterator[Batch | ShardFailure]], depth: int,
                 device: torch.device):
        self._produce = produce
        self._device = device
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
        if self._thread.ident is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            with dev.on_stream(dev.new_stream(self._device)):
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
