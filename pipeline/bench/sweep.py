"""mode=sweep: the model alone on fixed random inputs of its input size, at batch 1, 2, 4 … for each
precision, timed with `pipeline.autobatch.measure`: warm-up excluded, the clock read after the device has
finished. Unlike `batch_size=auto`, which times one point after the other, it makes several passes over
all points and reports each point's median, so a shared machine's drift hits every point alike. The
first out-of-memory size ends a precision and is marked, not fatal.
"""

from __future__ import annotations

import csv
import gc
import logging
import os
import statistics

import torch

from pipeline import cluster
from pipeline import device as dev
from pipeline.autobatch import format_table, measure, powers_of_two, recommend
from pipeline.bench.report import plot_sweep, write_json
from pipeline.model import load_model
from pipeline.scorer import Scorer
from pipeline.settings import ScoreSettings

log = logging.getLogger(__name__)


def resolve_precisions(names, device: torch.device) -> dict[str, list[str]]:
    """{resolved precision: the requested names that mean it}, in request order: `auto` that resolves to
    a precision already listed is measured once."""
    resolved: dict[str, list[str]] = {}
    for name in names:
        resolved.setdefault(dev.resolve_precision(name, device), []).append(name)
    return resolved


def run_sweep(settings: ScoreSettings, bench, build=None) -> dict:
    """Sweep batch sizes for every precision; prints a table per precision and writes sweep.{csv,json,png}."""
    device = cluster.resolve_device(settings.device)
    dev.configure(device, settings.seed)
    m = settings.model
    precisions = resolve_precisions(bench.precisions, device)
    loaded = {p: load_model(m, device, dev.DTYPES[p], settings.seed, build=build) for p in precisions}
    size = next(iter(loaded.values())).preprocess.crop_size  # the model's input size
    for precision, requested in precisions.items():
        if requested != [precision]:
            log.info("precision=%s stands for %s on %s", precision, "+".join(requested), device)
    report = {
        "mode": "sweep", "model": m.label, "image_size": size, "device": dev.describe(device),
        "max_batch_size": bench.max_batch_size, "repeats": bench.repeats, "warmup": bench.warmup,
        "tolerance": bench.tolerance,
        "peak_memory": "CUDA max allocated" if device.type == "cuda" else "process peak RSS during the point",
        "precisions": [],
    }
    models = {p: model.module for p, model in loaded.items()}
    del loaded
    for precision, points in sweep_points(settings, bench, device, models, size).items():
        chosen = recommend(points, bench.tolerance)
        ok = [p for p in points if not p["oom"]]
        best = max(ok, key=lambda p: p["images_per_sec"])["batch"] if ok else None
        report["precisions"].append({"precision": precision, "requested": precisions[precision],
                                     "recommended": chosen, "best_batch": best, "points": points})
        verdict = (f"recommended batch_size={chosen} (smallest within {bench.tolerance:.0%} of the best images/s)"
                   if chosen else "no batch size fits: out of memory at batch 1")
        print(f"\n{report['model']} {size}px precision={precision} on {report['device']}:\n"
              f"{format_table(points, chosen)}\n{verdict}", flush=True)
    write_sweep(report, bench.out_dir)
    print(f"wrote {', '.join(os.path.join(bench.out_dir, f) for f in ('sweep.csv', 'sweep.json', 'sweep.png'))}",
          flush=True)
    return report


def sweep_points(settings: ScoreSettings, bench, device: torch.device, models: dict,
                 size: int) -> dict[str, list[dict]]:
    """{precision: points for batch 1, 2, 4 … ending at the first out-of-memory size}.

    bench.repeats passes, each timing every (precision, batch) point once, so the drift of a shared
    machine hits every point alike; a point is the median of its passes. The first pass finds the sizes
    that fit (after bench.warmup untimed runs per point); later passes re-time those.
    """
    precisions = list(models)
    scorers = {p: Scorer(models.pop(p), 1, device, settings.oom) for p in precisions}
    runs: dict[str, dict[int, list[dict]]] = {p: {} for p in precisions}
    for repeat in range(bench.repeats):
        for precision, scorer in scorers.items():
            sizes = powers_of_two(bench.max_batch_size) if repeat == 0 else fitting_sizes(runs[precision])
            for batch in sizes:
                run = measure(scorer, batch, size, dev.DTYPES[precision], device,
                              repeats=1, warmup=bench.warmup if repeat == 0 else 0)
                runs[precision].setdefault(batch, []).append(run)
                log.info("pass=%d/%d precision=%s batch=%d %s", repeat + 1, bench.repeats, precision, batch,
                         "OOM" if run["oom"] else f"images_per_sec={run['images_per_sec']}")
                if run["oom"]:
                    break
    del scorers
    gc.collect()
    dev.empty_cache(device)
    return {p: [median_point(b, r) for b, r in sorted(runs[p].items()) if b <= first_oom(runs[p])] for p in precisions}


def fitting_sizes(runs: dict[int, list[dict]]) -> list[int]:
    return [b for b in sorted(runs) if b < first_oom(runs)]


def first_oom(runs: dict[int, list[dict]]) -> float:
    return min((b for b, r in runs.items() if any(x["oom"] for x in r)), default=float("inf"))


def median_point(batch: int, runs: list[dict]) -> dict:
    """One table row from a point's passes: the median time, the largest peak; OOM if any pass ran out."""
    if any(r["oom"] for r in runs):
        return {"batch": batch, "oom": True}
    ms = statistics.median(r["ms_per_batch"] for r in runs)
    return {"batch": batch, "ms_per_batch": round(ms, 3), "images_per_sec": round(batch * 1000 / ms, 2),
            "peak_mb": max(r["peak_mb"] for r in runs), "oom": False,
            "ms_per_pass": [r["ms_per_batch"] for r in runs]}


SWEEP_COLUMNS = ("precision", "batch", "ms_per_batch", "images_per_sec", "peak_mb", "oom", "recommended")


def write_sweep(report: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        for entry in report["precisions"]:
            for p in entry["points"]:
                writer.writerow({"precision": entry["precision"], "batch": p["batch"],
                                 "ms_per_batch": p.get("ms_per_batch", ""), "images_per_sec": p.get("images_per_sec", ""),
                                 "peak_mb": p.get("peak_mb", ""), "oom": p["oom"],
                                 "recommended": p["batch"] == entry["recommended"]})
    write_json(report, os.path.join(out_dir, "sweep.json"))
    plot_sweep(report, os.path.join(out_dir, "sweep.png"))

