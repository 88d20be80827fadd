"""Measure the model alone at growing batch sizes and pick one: used by `batch_size=auto` and `jobs.bench`.

Warm-up runs are excluded, each point is the median of several timed runs, and the clock is read
only after the device has finished its work. The recommendation is the smallest batch size whose
throughput is within `tolerance` of the best: past the plateau a bigger batch only costs memory.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time

import torch

from pipeline import device as dev
from pipeline.errors import OutOfMemoryAtOneRow
from pipeline.scorer import Scorer

log = logging.getLogger(__name__)


def powers_of_two(limit: int) -> list[int]:
    sizes, b = [], 1
    while b <= limit:
        sizes.append(b)
        b *= 2
    return sizes


def measure(scorer: Scorer, batch: int, image_size: int, dtype: torch.dtype, device: torch.device,
            repeats: int, warmup: int = 1) -> dict:
    """One point: {batch, ms_per_batch, images_per_sec, peak_mb} or {batch, oom: True}."""
    gc.collect()
    dev.empty_cache(device)
    dev.reset_peak_memory(device)
    try:
        x = torch.randn((batch, 3, image_size, image_size), device=device).to(dtype)
    except torch.OutOfMemoryError:
        return {"batch": batch, "oom": True}
    x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(warmup + repeats):
        dev.synchronize(device)
        start = time.perf_counter()
        if scorer.try_forward(x) is None:
            del x
            return {"batch": batch, "oom": True}
        dev.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1000
    return {"batch": batch, "ms_per_batch": round(ms, 3), "images_per_sec": round(batch * 1000 / ms, 2),
            "peak_mb": round(dev.peak_memory_mb(device), 1), "oom": False}


def recommend(points: list[dict], tolerance: float) -> int | None:
    ok = [p for p in points if not p["oom"]]
    if not ok:
        return None
    best = max(p["images_per_sec"] for p in ok)
    return min(p["batch"] for p in ok if p["images_per_sec"] >= (1 - tolerance) * best)


def format_table(points: list[dict], chosen: int | None) -> str:
    lines = [f"{'batch':>6} | {'ms/batch':>9} | {'images/s':>9} | {'peak MB':>8}"]
    best = max((p["images_per_sec"] for p in points if not p["oom"]), default=None)
    for p in points:
        if p["oom"]:
            lines.append(f"{p['batch']:>6} | {'OOM':>9} | {'':>9} | {'':>8}")
            continue
        mark = "  <- chosen" if p["batch"] == chosen else ("  (peak)" if p["images_per_sec"] == best else "")
        lines.append(f"{p['batch']:>6} | {p['ms_per_batch']:>9.2f} | {p['images_per_sec']:>9.1f} | "
                     f"{p['peak_mb']:>8.0f}{mark}")
    return "\n".join(lines)


def sweep(scorer: Scorer, image_size: int, dtype, device, max_batch: int, repeats: int) -> list[dict]:
    """Powers of two up to `max_batch`, stopping after the first out-of-memory point."""
    points = []
    for b in powers_of_two(max_batch):
        point = measure(scorer, b, image_size, dtype, device, repeats)
        points.append(point)
        if point["oom"]:
            break
    return points


def choose_batch_size(module, image_size: int, dtype, device, settings) -> tuple[int, list[dict]]:
    """`batch_size=auto`: sweep, print the table and the choice, return (choice, table)."""
    probe = Scorer(module, 1, device, settings.oom)
    points = sweep(probe, image_size, dtype, device, settings.auto.max_batch_size, settings.auto.repeats)
    chosen = recommend(points, settings.auto.tolerance)
    dev.release_memory(device)  # the sweep's largest batch stays reserved in torch's cache otherwise
    if chosen is None:
        raise OutOfMemoryAtOneRow(f"batch_size=auto: even batch 1 runs out of memory on {device}")
    print(f"batch_size=auto on {device}:\n{format_table(points, chosen)}\n"
          f"chose batch_size={chosen} (smallest within {settings.auto.tolerance:.0%} of the best images/s)", flush=True)
    return chosen, points
