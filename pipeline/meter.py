"""Throughput: a tqdm bar on a terminal, one log line every `log_every_s` otherwise (a batch log), and
the numbers for `_metrics/rank-NNNNN.json`, refreshed at the same interval and final at the end.

Time is split the way a user tunes a pipeline: waiting for input (the decoder is the bottleneck),
in the model (on CUDA measured with events, so it is GPU time without making the host wait), and
writing Parquet.
`sustained` leaves out the first `warmup_batches` (allocator warm-up, cuDNN autotuning, compilation).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from pipeline import device as dev
from pipeline.layout import metrics_file
from pipeline.manifest import format_eta


class Meter:
    def __init__(self, total_images: int, device: torch.device, progress: bool = True, warmup_batches: int = 2,
                 log_every_s: float = 60.0, on_refresh: Callable[[dict], None] | None = None):
        self.device = device
        self.total = total_images
        self.warmup_batches = warmup_batches
        self.seconds = {"input": 0.0, "write": 0.0}
        self.model_timer = dev.ModelTimer(device)
        self.images = 0
        self.batches = 0
        self.error_rows = 0
        self.oom_events = 0
        self.progress: list[list[float]] = []  # [unix time, images done] at every refresh: the run's rate over time
        self._start = time.perf_counter()
        self._started_at = time.time()
        self._steady_start: float | None = None
        self._steady_images = 0
        self._log_every_s, self._on_refresh = log_every_s, on_refresh
        self._last = (self._start, 0)  # (clock, images) at the last refresh
        terminal = sys.stderr.isatty()
        self._lines = progress and not terminal  # a batch log: plain lines, no carriage returns
        self._bar = tqdm(total=total_images, unit="img", dynamic_ncols=True, smoothing=0.1,
                         disable=not (progress and terminal), file=sys.stderr, mininterval=1.0)

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

    def batch_done(self, images: int, errors: int = 0, oom_events: int = 0, **postfix) -> None:
        """Count a finished batch of `images` real rows, `errors` of them error rows; `oom_events` so far."""
        self.batches += 1
        self.images += images
        self.error_rows += errors
        self.oom_events = oom_events
        now = time.perf_counter()
        if self.batches == self.warmup_batches:
            self._steady_start = now
        elif self.batches > self.warmup_batches:
            self._steady_images += images
        self._bar.update(images)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        if now - self._last[0] >= self._log_every_s:
            self.refresh(now)

    def refresh(self, now: float | None = None) -> None:
        """A progress point, a log line (in a batch log) and the running metrics."""
        now = time.perf_counter() if now is None else now
        interval = self.images - self._last[1]
        rate = interval / (now - self._last[0]) if now > self._last[0] else 0.0
        self._last = (now, self.images)
        self.progress.append([round(time.time(), 1), self.images])
        if len(self.progress) > 2000:  # a week at one point a minute; then keep every other point
            self.progress = self.progress[::2]
        if self._lines:  # on stderr, where a terminal's bar would be (Slurm's .err file)
            sustained = self.sustained_rate()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"[{stamp}][progress] images={self.images}/{self.total} rate={rate:.1f}/s sustained={sustained:.1f}/s "
                  f"eta={format_eta(self.total - self.images, sustained)} oom_events={self.oom_events} "
                  f"error_rows={self.error_rows}", file=sys.stderr, flush=True)
        if self._on_refresh is not None:
            self._on_refresh({**self.summary(), "interval_images_per_sec": round(rate, 2)})

    def sustained_rate(self) -> float:
        if self._steady_start is not None and self._steady_images:
            return self._steady_images / (time.perf_counter() - self._steady_start)
        elapsed = self.elapsed
        return self.images / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        self._bar.close()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def summary(self) -> dict:
        elapsed = self.elapsed
        rate = self.images / elapsed if elapsed > 0 else 0.0
        # With too few batches for a steady state, the whole-run rate is the honest figure.
        sustained = self.sustained_rate()
        return {
            "started_at": round(self._started_at, 3),
            "images": self.images,
            "total_images": self.total,
            "error_rows": self.error_rows,
            "batches": self.batches,
            "seconds": round(elapsed, 3),
            "images_per_sec": round(rate, 2),
            "sustained_images_per_sec": round(sustained, 2),
            "eta_seconds": round((self.total - self.images) / sustained, 1) if sustained > 0 else None,
            "progress": self.progress,
            "warmup_batches": self.warmup_batches,
            "time_split_seconds": {"input": round(self.seconds["input"], 3),
                                   "model": round(self.model_timer.total(), 3),
                                   "write": round(self.seconds["write"], 3)},
        }


def write_metrics(layout, rank: int, metrics: dict) -> str:
    """`_metrics/rank-NNNNN.json` in the output folder (an OutputLayout), replaced atomically."""
    return layout.write_json(metrics_file(rank), metrics)
