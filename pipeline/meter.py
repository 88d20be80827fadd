"""Throughput: a tqdm bar while running, and the numbers for `metrics/rank-NNNNN.json` at the end.

Time is split the way a user tunes a pipeline: waiting for input (the decoder is the bottleneck),
in the model (on CUDA measured with events, so it is GPU time without making the host wait), and
writing Parquet.
`sustained` leaves out the first `warmup_batches` (allocator warm-up, cuDNN autotuning, compilation).
"""

from __future__ import annotations

import contextlib
import sys
import time

import torch
from tqdm import tqdm

from pipeline import device as dev


class Meter:
    def __init__(self, total_images: int, device: torch.device, progress: bool = True, warmup_batches: int = 2):
        self.device = device
        self.warmup_batches = warmup_batches
        self.seconds = {"input": 0.0, "write": 0.0}
        self.model_timer = dev.ModelTimer(device)
        self.images = 0
        self.batches = 0
        self._start = time.perf_counter()
        self._steady_start: float | None = None
        self._steady_images = 0
        self._bar = tqdm(total=total_images, unit="img", dynamic_ncols=True, smoothing=0.1,
                         disable=not progress, file=sys.stderr, mininterval=1.0)

    @contextlib.contextmanager
    def timing(self, stage: str):
        if stage == "model":
            self.model_timer.start()
            try:
                yield
            finally:
                self.model_timer.stop()
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def batch_done(self, images: int, **postfix) -> None:
        """Count a finished batch of `images` real rows."""
        self.batches += 1
        self.images += images
        if self.batches == self.warmup_batches:
            self._steady_start = time.perf_counter()
        elif self.batches > self.warmup_batches:
            self._steady_images += images
        self._bar.update(images)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self._bar.close()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def summary(self) -> dict:
        elapsed = self.elapsed
        rate = self.images / elapsed if elapsed > 0 else 0.0
        steady = None
        if self._steady_start is not None and self._steady_images:
            steady = self._steady_images / (time.perf_counter() - self._steady_start)
        return {
            "images": self.images,
            "batches": self.batches,
            "seconds": round(elapsed, 3),
            "images_per_sec": round(rate, 2),
            # With too few batches for a steady state, the whole-run rate is the honest figure.
            "sustained_images_per_sec": round(steady if steady is not None else rate, 2),
            "warmup_batches": self.warmup_batches,
            "time_split_seconds": {"input": round(self.seconds["input"], 3),
                                   "model": round(self.model_timer.total(), 3),
                                   "write": round(self.seconds["write"], 3)},
        }


def write_metrics(layout, rank: int, metrics: dict) -> str:
    """`_metrics/rank-NNNNN.json` in the output folder (an OutputLayout), replaced atomically."""
    return layout.write_json(f"_metrics/rank-{rank:05d}.json", metrics)
