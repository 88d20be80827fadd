"""DALI's side of decoding: `fn.decoders.image` (nvJPEG through `mixed` on CUDA; libjpeg-turbo and friends
on the CPU), resize and crop, and normalisation into the model's dtype and layout, all inside DALI, for
batches of encoded images fed from Python, two in flight.

A batch that fails is never a reason to rebuild the pipeline (DALI runs on after an error; one that does
not is rebuilt): after an out-of-memory error, memory is released and the same images are decoded again
in smaller decode batches, and never written as bad images; after any other error, the images DALI names
are judged by a CPU decode pipeline built once and kept, the reference: an image is `decode_error` only
when it fails there alone and torchvision (the torch back-end's decoder) cannot decode it either.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pipeline import device as dev
from pipeline.decode.assemble import Normalizer, Preprocess, resize_and_crop
from pipeline.decode.dali_read import shut_down
from pipeline.decode.samples import one_line
from pipeline.errors import OutOfMemoryAtOneRow
from pipeline.scorer import MicroBatchPolicy

log = logging.getLogger(__name__)

INTERP = {"bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC"}
# Python's view of a failed DALI run: RuntimeError; std::bad_alloc may come through as MemoryError.
DECODE_ERRORS = (RuntimeError, MemoryError)
_FAILED_SAMPLE = re.compile(r"Failed to decode sample #(\d+)")  # nvImageCodec's per-sample failure, DALI's words


class _OutOfMemory(Exception):
    pass


class _ReferenceOutOfMemory(Exception):
    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class DecodeStage:
    """Encoded images → their crops, one [n, S, S, 3] tensor per preprocessing ("branch"; NHWC: channels_last
    once permuted) on the device, each image decoded once: normalised in the model's dtype on CUDA, uint8
    on the CPU (see `output_dtype`). A batch's views are a tuple, one tensor per branch, everywhere below.

    `start` feeds a batch and returns at once; `finish` (in the same order) returns its views and the
    indices of those that fail alone. Two batches are in flight when the caller starts the next before
    finishing this one, so DALI's host work on the next batch overlaps the device work on this one."""

    def __init__(self, preprocesses: list[Preprocess], batch_size: int, device: torch.device, dtype: torch.dtype,
                 loader, oom):
        self.preprocesses, self.batch_size, self.device, self.dtype, self.loader = (preprocesses, batch_size, device,
                                                                                    dtype, loader)
        self.policy = MicroBatchPolicy(batch_size, oom.regrow_after)
        self.fallbacks = 0  # batches that failed and had their images judged one by one
        self.oom_events = 0
        self.reference_decodes = 0  # images decoded by the reference (DALI's CPU decoder, else torchvision) instead
        self._inject_oom_above = oom.inject_decode_above
        self.out_dtype = output_dtype(device, dtype)
        self._pipe = DecodePipeline(preprocesses, batch_size, device, self.out_dtype, loader)
        self._reference: DecodePipeline | None = None  # built when a batch first fails, then kept
        self._queued: deque[int] = deque()  # tokens of the batches running in DALI, in order
        self._results: dict[int, object] = {}  # outputs taken out of DALI early: the views or the error
        self._next_token = 0

    def close(self) -> None:
        self._queued.clear()
        self._results.clear()
        self._pipe.close()
        if self._reference is not None:
            self._reference.close()

    def start(self, encoded) -> int:
        token, self._next_token = self._next_token, self._next_token + 1
        if len(encoded) <= self.policy.next_size():  # else `finish` decodes it in smaller batches
            try:
                self._pipe.feed(encoded)
                self._queued.append(token)
            except DECODE_ERRORS as e:  # DALI could not even take the batch in (out of host memory, say)
                self._results[token] = e
        return token

    def finish(self, token: int, encoded) -> tuple[tuple[torch.Tensor, ...], list[int]]:
        """(views of those that decoded, in order; indices into `encoded` of those that failed alone)."""
        result = self._take(token)
        if isinstance(result, tuple):
            self.policy.on_batch_done()
            return result, []
        error = None
        self._drain()  # DALI's queue must be empty before any image runs again (a later batch may be in it)
        if result is not None:  # DALI failed on the whole batch
            if dev.is_out_of_memory(result):
                self._on_oom(len(encoded), result)
            else:
                self.fallbacks += 1
                error = result
        results = self._decode_in_batches(list(encoded), error)
        self.policy.on_batch_done()
        failed = [i for i, r in enumerate(results) if r is None]
        good = [r for r in results if r is not None]
        return (tuple(torch.cat(views) for views in zip(*good)) if good else self._pipe.empty()), failed

    # --- taking outputs out of DALI, in order --------------------------------------------------------

    def _take(self, token: int):
        """The output of batch `token` (the oldest one running): its views, the error DALI raised for it,
        or None if it never ran."""
        if token in self._results:
            return self._results.pop(token)
        if not self._queued or self._queued[0] != token:
            return None
        self._queued.popleft()
        return self._output()

    def _drain(self) -> None:
        """Take every batch still running out of DALI; their outputs wait for their `finish`."""
        while self._queued:
            self._results[self._queued.popleft()] = self._output()

    def _output(self):
        try:
            images = self._pipe.output()
            if self._inject_oom_above is not None and images[0].shape[0] > self._inject_oom_above:
                raise torch.OutOfMemoryError(f"out of memory (injected: decoding {images[0].shape[0]} images > "
                                             f"oom.inject_decode_above={self._inject_oom_above})")
            return images
        except (*DECODE_ERRORS, torch.OutOfMemoryError) as e:
            log.debug("DALI decode failed: %s", one_line(e))
            return e

    # --- decoding again, after an error ---------------------------------------------------------------

    def _decode_in_batches(self, items: list, error: BaseException | None = None) -> list[tuple | None]:
        """Per item its views (each [1, S, S, 3]), or None when it fails alone; decode batches shrink on OOM.
        `error`: what DALI raised for all of `items` already, so the first try is not run again."""
        results: list[torch.Tensor | None] = []
        while len(results) < len(items):
            chunk = items[len(results): len(results) + self.policy.next_size()]
            try:
                results += self._decode_chunk(chunk, error if len(chunk) == len(items) else None)
            except _OutOfMemory:
                pass
            error = None
        return results

    def _decode_chunk(self, chunk: list, error: BaseException | None) -> list[tuple | None]:
        """Decode `chunk` on the main pipeline; an image DALI names as failed is judged by the reference
        decoder and left out of the next try. Raises _OutOfMemory (the decode batch halved) when memory ran out."""
        results: list[tuple | None] = [None] * len(chunk)
        todo = list(range(len(chunk)))
        misses = 0
        while todo:
            if error is not None:
                output, error = error, None
            else:
                output = self._run([chunk[i] for i in todo])
            if isinstance(output, tuple):
                for i, views in zip(todo, _per_image(output)):
                    results[i] = views
                return results
            if dev.is_out_of_memory(output):
                self._shrink(len(todo), output)
            self._pipe.ensure_usable()
            named = _failed_sample(output, len(todo))
            if named is None:  # DALI did not say which: the reference decodes them all
                for i, image in zip(todo, self._judge([chunk[i] for i in todo])):
                    results[i] = image
                return results
            i = todo.pop(named)
            try:
                results[i] = self._reference_decode(chunk[i])
            except _ReferenceOutOfMemory as e:
                self._shrink(len(todo) + 1, e.error)
            if results[i] is not None:  # the bytes are fine: the main decoder failed for another reason
                self.reference_decodes += 1
                misses += 1
                if misses > 1 and len(todo) > 1:  # more than one such image: most likely device memory
                    self._shrink(len(todo) + 1, output)
        return results

    def _run(self, items: list):
        """Decode `items` on the main pipeline now: their views, or the error DALI raised."""
        try:
            self._pipe.feed(items)
        except DECODE_ERRORS as e:
            return e
        return self._output()

    def _judge(self, items: list) -> list[tuple | None]:
        """Decode `items` on the reference pipeline: per item its views, or None when it fails alone there."""
        results: list[tuple | None] = [None] * len(items)
        groups = [list(range(len(items)))]
        while groups:
            group = groups.pop()
            output = self._reference_run([items[i] for i in group])
            if isinstance(output, tuple):
                for i, views in zip(group, _per_image(output)):
                    results[i] = tuple(dev.to_device(v.clone(), self.device) for v in views)
                continue
            if len(group) == 1:
                results[group[0]] = self._second_opinion(items[group[0]])  # None: decode_error
                continue
            named = _failed_sample(output, len(group))
            if named is not None and not dev.is_out_of_memory(output):
                groups.append([i for k, i in enumerate(group) if k != named])
                groups.append([group[named]])  # judged alone
                continue
            size = math.isqrt(len(group)) if not dev.is_out_of_memory(output) else (len(group) + 1) // 2
            groups += [group[s: s + size] for s in range(0, len(group), size)]
        self.reference_decodes += sum(r is not None for r in results)
        return results

    def _reference_decode(self, item) -> tuple | None:
        """One image on the reference pipeline; if that fails too, the torch back-end's decoder decides."""
        output = self._reference_run([item])
        if isinstance(output, tuple):
            return tuple(dev.to_device(v.clone(), self.device) for v in output)
        return self._second_opinion(item)

    def _second_opinion(self, item) -> tuple | None:
        """An image DALI's CPU decoder failed on alone, decoded by torchvision (what decoder=torch does): its
        image, or None when it fails there too (decode_error). DALI says only "Failed to decode sample #i"
        even when the decoder ran out of memory; torchvision says which it was."""
        try:
            from pipeline.decode.torch import decode_and_crop  # (torchvision: imported on the first need)

            crops = decode_and_crop(np.ascontiguousarray(item).tobytes(), self.preprocesses)
        except Exception as e:  # noqa: BLE001 (any decoder error: the image is bad)
            if dev.is_out_of_memory(e):
                raise _ReferenceOutOfMemory(e) from None
            return None
        views = []
        for crop, p in zip(crops, self.preprocesses):
            if self.out_dtype == torch.uint8:
                image = crop.permute(1, 2, 0)[None].contiguous()
            else:  # normalised as DALI would have: one row through the Normalizer (channels_last, so NHWC)
                image = Normalizer(1, p, torch.device("cpu"), self.out_dtype).batch(crop[None])
                image = image.permute(0, 2, 3, 1)
            views.append(dev.to_device(image, self.device))
        return tuple(views)

    def _reference_run(self, items: list):
        if self._reference is None:
            log.info("building DALI's CPU decode pipeline to judge images the %s decoder failed on", self.device.type)
            self._reference = DecodePipeline(self.preprocesses, self.batch_size, torch.device("cpu"), self.out_dtype,
                                              self.loader)
        try:
            self._reference.feed(items)
            return self._reference.output()
        except DECODE_ERRORS as e:
            self._reference.ensure_usable()
            return e

    def _shrink(self, size: int, error: BaseException) -> None:
        """`_on_oom`, then _OutOfMemory for the caller to retry."""
        self._on_oom(size, error)
        raise _OutOfMemory()

    def _on_oom(self, size: int, error: BaseException) -> None:
        """After an out-of-memory error at `size` images: release memory and halve the decode batch; at one
        image, give up."""
        self.oom_events += 1
        log.warning("out of memory decoding %d images on %s (%s); memory released, retrying them in smaller "
                    "decode batches", size, self.device, one_line(error)[:160])
        dev.release_memory(self.device)
        try:
            self.policy.on_oom(size)
        except OutOfMemoryAtOneRow:
            raise OutOfMemoryAtOneRow(f"out of memory decoding a single image on {self.device}") from None


def _per_image(views: tuple[torch.Tensor, ...]):
    """A batch's views → per image, its views (each [1, S, S, 3])."""
    return zip(*(v.split(1) for v in views))


def _failed_sample(error: BaseException, count: int) -> int | None:
    found = _FAILED_SAMPLE.search(str(error))
    return int(found.group(1)) if found and int(found.group(1)) < count else None


class DecodePipeline:
    """One DALI pipeline: encoded images in, each decoded once; per preprocessing, the resized and cropped
    images out, NHWC, as uint8 or normalised in `out_dtype` (float16 or float32). Primed at build with two
    tiny batches, so that each `feed` runs exactly one batch (DALI's first run would otherwise run as many
    as its queue is deep)."""

    def __init__(self, preprocesses: list[Preprocess], batch_size: int, device: torch.device, out_dtype: torch.dtype,
                 loader):
        self.preprocesses, self.batch_size, self.device, self.dtype, self.loader = (preprocesses, batch_size, device,
                                                                                    out_dtype, loader)
        self.torch_resize = resizes_in_torch(loader.dali.resize, out_dtype)
        self._resizers: ThreadPoolExecutor | None = None
        self._pipe = None
        self._build()

    def feed(self, encoded) -> None:
        self._pipe.feed_input("encoded", encoded)
        self._pipe.schedule_run()

    def output(self) -> tuple[torch.Tensor, ...]:
        """The next batch's views, each [n, S, S, 3] and a tensor of its own: on the CPU, a view of memory
        DALI's dynamic executor does not reuse while it is referenced (tests/test_decode_failures.py checks it)."""
        if self.torch_resize:
            return self._resize_in_torch(self._pipe.outputs()[0])
        return tuple(to_torch(out.as_tensor(), self.device) for out in self._pipe.outputs())

    def _resize_in_torch(self, decoded) -> tuple[torch.Tensor, ...]:
        """DALI's decoded images (HWC, each its own size) → each branch's uint8 crops [n, S, S, 3], resized by
        the torch back-end's code in `loader.threads` threads (torch releases the GIL while it resizes)."""
        # A CHW view of HWC images has channels_last strides: torch's fast uint8 path, no copy.
        if decoded.is_dense_tensor():  # all of one size (as tiny images often are): the batch in one call each
            batch = torch.from_numpy(np.asarray(decoded.as_tensor())).permute(0, 3, 1, 2)
            return tuple(resize_and_crop(batch, p).permute(0, 2, 3, 1) for p in self.preprocesses)
        if self._resizers is None:
            self._resizers = ThreadPoolExecutor(max(1, self.loader.threads), thread_name_prefix="shardscore-resize")
        images = [torch.from_numpy(np.asarray(decoded[i])).permute(2, 0, 1) for i in range(len(decoded))]
        crops = tuple(torch.empty((len(images), p.crop_size, p.crop_size, 3), dtype=torch.uint8)
                      for p in self.preprocesses)  # NHWC, as DALI's own output and the batch tensor

        def fill(start: int) -> None:
            for i in range(start, min(start + step, len(images))):
                for p, out in zip(self.preprocesses, crops):
                    out[i] = resize_and_crop(images[i], p).permute(1, 2, 0)

        step = 8  # images a task: small enough that the threads finish a batch together
        list(self._resizers.map(fill, range(0, len(images), step)))  # (raises what a resize raised)
        return crops

    def empty(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.empty((0, p.crop_size, p.crop_size, 3), dtype=self.dtype, device=self.device)
                     for p in self.preprocesses)

    def ensure_usable(self) -> None:
        """After an error: run a tiny batch; a pipeline that cannot (older DALI) is built again."""
        try:
            self.feed(_tiny_batch())
            self.output()
        except DECODE_ERRORS:
            log.info("DALI's pipeline does not run after an error: building it again")
            self._build()

    def close(self) -> None:
        """Free the pipeline's buffers and threads now (a DALI pipeline sits in reference cycles)."""
        shut_down(self._pipe)
        self._pipe = None
        if self._resizers is not None:
            self._resizers.shutdown()
            self._resizers = None

    def _build(self) -> None:
        self.close()  # the old pipeline's buffers go before the new one allocates
        self._pipe = _build_decode_pipeline([] if self.torch_resize else self.preprocesses, self.batch_size,
                                            self.device, self.dtype, self.loader)
        for _ in range(self._pipe.prefetch_queue_depth):
            self._pipe.feed_input("encoded", _tiny_batch())
        self._pipe.schedule_run()
        for _ in range(self._pipe.prefetch_queue_depth):
            self._pipe.outputs()


_TINY: list[np.ndarray] = []


def _tiny_batch() -> list[np.ndarray]:
    """One 8×8 grey JPEG, made once: what primes and checks a pipeline."""
    if not _TINY:
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="JPEG")
        _TINY.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    return list(_TINY)


def resizes_in_torch(setting: str, out_dtype: torch.dtype) -> bool:
    """Where crops are resized: in DALI wherever DALI normalises (on CUDA, on the device, where resizing is
    cheap next to decoding), else (the CPU) by the torch back-end's resize: here 3× faster than DALI's CPU
    resize, which made each extra model's preprocessing cost more than the decode it saves, and the same
    pixels as decoder=torch from the same decoded image (docs/BENCHMARKS.md). `loader.dali.resize`:
    auto | dali | torch (dali: DALI's CPU resize, the graph the GPU runs)."""
    if out_dtype != torch.uint8:
        return False
    return setting != "dali"


def output_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """What DALI gives the model stage. On CUDA the input normalised in the model's dtype (float32 for
    bf16, which DALI lacks): one pass over the batch, no float32 copy of it. On the CPU uint8 crops,
    normalised by one multiply-add straight into the batch tensor, as before DALI could normalise: a 4×
    smaller output to hold, and no per-row gain from the other form could be shown (docs/BENCHMARKS.md)."""
    if device.type != "cuda":
        return torch.uint8
    return torch.float16 if dtype == torch.float16 else torch.float32


def _build_decode_pipeline(preprocesses: list[Preprocess], batch_size: int, device: torch.device,
                           out_dtype: torch.dtype, loader):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    d = loader.dali
    # Options of the GPU decoder only; DALI ignores them on the CPU (see conf/config.yaml loader.dali).
    gpu_options = dict(hw_decoder_load=d.hw_decoder_load, jpeg_fancy_upsampling=d.jpeg_fancy_upsampling,
                       preallocate_width_hint=d.preallocate_width_hint,
                       preallocate_height_hint=d.preallocate_height_hint,
                       device_memory_padding=d.device_memory_padding,
                       host_memory_padding=d.host_memory_padding) if gpu else {}

    @pipeline_def(batch_size=batch_size, num_threads=max(1, loader.threads),
                  device_id=(device.index or 0) if gpu else None, prefetch_queue_depth=2, exec_dynamic=True)
    def decode():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB, **gpu_options)
        if not preprocesses:  # decoded images, each its own size: resized outside DALI
            return images
        views = []
        for p in preprocesses:  # one decode, then a resize and crop (and normalisation) per branch
            crops = fn.resize_crop_mirror(images, resize_shorter=p.resize_size, crop=(p.crop_size, p.crop_size),
                                          antialias=True, interp_type=getattr(types, INTERP[p.interpolation]))
            if out_dtype != torch.uint8:
                # (x - mean) / std, in the model's dtype and the channels_last layout, on the device: no
                # float32 copy of the batch in between (B=1024 at 448 px: 2.5 GB).
                crops = fn.crop_mirror_normalize(crops, mean=[m * 255 for m in p.mean], std=[s * 255 for s in p.std],
                                                 dtype=types.FLOAT16 if out_dtype == torch.float16 else types.FLOAT,
                                                 output_layout="HWC")
            views.append(crops)
        return tuple(views)

    pipe = decode()
    pipe.build()
    return pipe


def to_torch(tensor, device: torch.device) -> torch.Tensor:
    """A DALI dense tensor as a torch tensor on `device`, without a host round-trip on CUDA; on the CPU a
    view of DALI's buffer, which stays valid while the view is referenced (the dynamic executor)."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        result = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(device))
        return result
    return torch.from_dlpack(tensor)
