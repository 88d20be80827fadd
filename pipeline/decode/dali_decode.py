"""DALI's side of decoding: `fn.decoders.image` (nvJPEG on CUDA through `mixed`, libjpeg-turbo and
friends on the CPU), then resize and crop, for batches of encoded images fed from Python, one in flight.

When DALI fails, the pipeline is rebuilt and the same images are decoded again: after an out-of-memory
error with memory released and in smaller decode batches, never written as a bad image; after any
other error in parts, so an image is `decode_error` only when it fails alone.
"""

from __future__ import annotations

import logging
import math

import torch

from pipeline import device as dev
from pipeline.decode.assemble import Preprocess
from pipeline.decode.samples import one_line
from pipeline.errors import OutOfMemoryAtOneRow
from pipeline.scorer import MicroBatchPolicy, is_oom

log = logging.getLogger(__name__)

INTERP = {"bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC"}


class DecodeStage:
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
