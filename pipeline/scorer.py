"""Fixed-shape forward passes that survive out-of-memory by halving the micro-batch.

A Batch of `batch_size` rows runs as equal chunks of the current micro-batch (the tail chunk padded,
so the model only ever sees one shape). On OOM the same rows are retried at half the size, after the
failed tensors are freed outside the `except` block (a live traceback would keep them allocated).
The size bookkeeping is `MicroBatchPolicy`, plain logic with no tensors.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline import device as dev
from pipeline.errors import OutOfMemoryAtOneRow
from pipeline.settings import OomSettings

log = logging.getLogger(__name__)

def _as_dict(out) -> dict[str, torch.Tensor]:
    """Models from pipeline.model give {"output", "embedding"}; a bare module gives a tensor."""
    return out if isinstance(out, dict) else {"output": out}


class MicroBatchPolicy:
    """Which micro-batch size to run next: halve on OOM, try doubling after `regrow_after` good batches,
    never above `batch_size`, and stop growing for good once a regrowth attempt runs out of memory."""

    def __init__(self, batch_size: int, regrow_after: int):
        self.batch_size = batch_size
        self.regrow_after = regrow_after
        self.size = batch_size
        self.min_size = batch_size
        self.events = 0
        self.growth_stopped = False
        self._good_batches = 0
        self._trying = None  # the size a regrowth attempt is running at

    def next_size(self) -> int:
        if (self.size < self.batch_size and not self.growth_stopped and self._trying is None
                and self._good_batches >= self.regrow_after):
            self._trying = min(self.size * 2, self.batch_size)
            return self._trying
        return self._trying or self.size

    def on_oom(self, size: int) -> int:
        """The size to retry at; raises OutOfMemoryAtOneRow when `size` was already 1."""
        self.events += 1
        if size <= 1:
            raise OutOfMemoryAtOneRow("out of memory at micro-batch 1")
        if self._trying is not None:
            self.growth_stopped = True
            self._trying = None
        self.size = min(self.size, (size + 1) // 2)
        self.min_size = min(self.min_size, self.size)
        self._good_batches = 0
        return self.size

    def on_batch_done(self) -> None:
        if self._trying is not None:
            log.info("micro-batch regrew from %d to %d", self.size, self._trying)
            self.size, self._trying, self._good_batches = self._trying, None, 0
        else:
            self._good_batches += 1


class Scorer:
    """`forward(images)` → the model's outputs ({"output", "embedding"}) for every row, in order; owns
    OOM halving."""

    def __init__(self, module: nn.Module, batch_size: int, device: torch.device, oom: OomSettings, context: str = "",
                 micro_batch: int | None = None):
        self.module = module
        self.device = device
        self.batch_size = batch_size  # rows per call
        self.context = context  # model, precision and input size, for the give-up message
        # `micro_batch`: the largest chunk this model runs at (its own memory), at most the batch
        self.policy = MicroBatchPolicy(min(micro_batch or batch_size, batch_size), oom.regrow_after)
        self.inject_above = oom.inject_above
        self.inject_limit = oom.inject_limit
        self.injected = 0

    @property
    def micro_batch(self) -> int:
        return self.policy.size

    def forward(self, images: torch.Tensor, valid: int | None = None) -> dict[str, torch.Tensor]:
        """The model's outputs for the first `valid` rows of `images` (all by default), run over every row
        (padding included: one static shape) in chunks of the current micro-batch."""
        total = images.shape[0]
        if total != self.batch_size:  # the decoder and the scorer were given different batch sizes
            raise RuntimeError(f"a batch of {total} rows reached a scorer of batch size {self.batch_size}")
        outputs = []
        start = 0
        size = self.policy.next_size()
        while start < total:
            rows = min(size, total - start)
            chunk = images[start : start + rows]
            if rows < size:  # keep the one static shape (and memory format): pad the tail chunk
                padded = torch.empty((size, *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device,
                                     memory_format=torch.channels_last if chunk.dim() == 4 else torch.contiguous_format)
                padded[:rows] = chunk
                padded[rows:] = 0
                chunk = padded
            out = self.try_forward(chunk)
            if out is None:
                del chunk  # the failed input must be gone before the retry allocates again
                dev.release_memory(self.device)  # torch's cache and DALI's pool
                size = self._halve(size)
                continue
            outputs.append({name: value[:rows] for name, value in _as_dict(out).items()})
            start += rows
        self.policy.on_batch_done()
        merged = outputs[0] if len(outputs) == 1 else {name: torch.cat([o[name] for o in outputs]) for name in outputs[0]}
        return merged if valid is None else {name: value[:valid] for name, value in merged.items()}

    def try_forward(self, chunk: torch.Tensor):
        """The model's output, or None after an out-of-memory error (any other error propagates)."""
        try:
            with torch.inference_mode():
                self._maybe_inject(chunk.shape[0])
                return self.module(chunk)
        except Exception as e:
            if not dev.is_out_of_memory(e):
                raise
            self._last_oom = " ".join(str(e).split())[:200]
        return None

    def _halve(self, size: int) -> int:
        try:
            new_size = self.policy.on_oom(size)
        except OutOfMemoryAtOneRow:
            raise OutOfMemoryAtOneRow(
                f"out of memory at micro-batch 1 on {self.device}: {self.context} does not fit "
                f"({self._last_oom})") from None
        log.warning("OOM at micro-batch %d on %s; retrying at %d", size, self.device, new_size)
        return new_size

    def _maybe_inject(self, rows: int) -> None:
        """oom.inject_above: a real OutOfMemoryError, to rehearse recovery on a machine with memory to spare."""
        if self.inject_above is None or rows <= self.inject_above:
            return
        if self.inject_limit is not None and self.injected >= self.inject_limit:
            return
        self.injected += 1
        raise torch.OutOfMemoryError(f"out of memory (injected: {rows} rows > oom.inject_above={self.inject_above})")
