"""mode=sweep: the model alone on fixed random inputs of its input size, at batch 1, 2, 4 … for each
back-end × precision ("series": eager and compile in the float precisions; onnxruntime and tensorrt also
in int8), timed with `pipeline.autobatch.measure`: warm-up excluded, the clock read after the device has
finished. An engine is built (or loaded from its cache) for each batch size in its warm-up, and that
build's seconds are reported beside its throughput. Unlike `batch_size=auto`, which times one point after
the other, it makes several passes over all points and reports each point's median, so a shared machine's
drift hits every point alike. The first out-of-memory size ends a series and is marked, not fatal.
"""

from __future__ import annotations

import csv
import gc
import logging
import os
import statistics
from dataclasses import replace

import numpy as np
import torch

from pipeline import cluster
from pipeline import device as dev
from pipeline.autobatch import format_table, measure, powers_of_two, recommend
from pipeline.bench.report import plot_sweep, write_json
from pipeline.bench.overhead import cpu_flags
from pipeline.engines import ENGINES, Engine, check_backend
from pipeline.engines.build import engine_for
from pipeline.model import compile_model, load_model
from pipeline.models import PlannedModel
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
    """Sweep batch sizes for every back-end × precision; prints a table per series and writes
    sweep.{csv,json,png}."""
    device = cluster.resolve_device(settings.device)
    dev.configure(device, settings.seed)
    m = settings.model
    precisions = resolve_precisions(bench.precisions, device)
    for name in bench.backends:
        check_backend(name, "fp32", device, "bench.backends")
    series = [(b, p) for b in bench.backends for p in precisions if p != "int8" or b in ENGINES]
    floats = {dev.float_dtype(p, device) for _, p in series}
    loaded = {dtype: load_model(m, device, dtype, settings.seed, build=build) for dtype in floats}
    size = next(iter(loaded.values())).preprocess.crop_size  # the model's input size
    for precision, requested in precisions.items():
        if requested != [precision]:
            log.info("precision=%s stands for %s on %s", precision, "+".join(requested), device)
    report = {
        "mode": "sweep", "model": m.label, "image_size": size, "device": dev.describe(device),
        "cpu_flags": cpu_flags(), "max_batch_size": bench.max_batch_size, "repeats": bench.repeats,
        "warmup": bench.warmup, "tolerance": bench.tolerance,
        "peak_memory": "CUDA max allocated" if device.type == "cuda" else "process peak RSS during the point",
        "series": [],
    }
    modules = {(b, p): series_module(loaded[dev.float_dtype(p, device)], b, p, settings, device, size)
               for b, p in series}
    del loaded
    for (backend, precision), points in sweep_points(settings, bench, device, modules, size).items():
        chosen = recommend(points, bench.tolerance)
        ok = [p for p in points if not p["oom"]]
        best = max(ok, key=lambda p: p["images_per_sec"])["batch"] if ok else None
        report["series"].append({"backend": backend, "precision": precision, "requested": precisions[precision],
                                 "recommended": chosen, "best_batch": best, "points": points})
        verdict = (f"recommended batch_size={chosen} (smallest within {bench.tolerance:.0%} of the best images/s)"
                   if chosen else "no batch size fits: out of memory at batch 1")
        print(f"\n{report['model']} {size}px backend={backend} precision={precision} on {report['device']}:\n"
              f"{format_table(points, chosen)}\n{verdict}", flush=True)
    print(format_peaks(report), flush=True)
    write_sweep(report, bench.out_dir)
    print(f"wrote {', '.join(os.path.join(bench.out_dir, f) for f in ('sweep.csv', 'sweep.json', 'sweep.png'))}",
          flush=True)
    return report


def series_module(loaded, backend: str, precision: str, settings: ScoreSettings, device: torch.device, size: int):
    """What one series runs: the eager (or compiled) model, or its Engine, built per batch size on first use
    and not gated (the sweep times it; it scores nothing)."""
    if backend == "eager":
        return loaded.module
    if backend == "compile":
        return compile_model(loaded.module)
    planned = PlannedModel(None, replace(settings.model, backend=backend), loaded, [], 0, {}, (3, size, size))
    dtype = dev.float_dtype(precision, device)
    calibration = RandomCalibration(settings.engine.calibration_images, size)
    engine = engine_for(planned, backend, precision, dtype, device, settings.engine, calibration,
                        calibration.identity, False)
    engine.reference = None
    return engine


class RandomCalibration:
    """int8 calibration images for the sweep: seeded normal noise, like its inputs (speed does not depend on it)."""

    def __init__(self, images: int, size: int):
        self.images, self.size = images, size
        self.identity = {"random_normal": images, "seed": 0}

    def __call__(self) -> np.ndarray:
        return np.random.default_rng(0).standard_normal((self.images, 3, self.size, self.size), dtype=np.float32)


def sweep_points(settings: ScoreSettings, bench, device: torch.device, modules: dict,
                 size: int) -> dict[tuple, list[dict]]:
    """{(backend, precision): points for batch 1, 2, 4 … ending at the first out-of-memory size}.

    bench.repeats passes, each timing every point once, so the drift of a shared machine hits every point
    alike; a point is the median of its passes. The first pass finds the sizes that fit (after bench.warmup
    untimed runs per point, at least one for an engine: its build); later passes re-time those.
    """
    keys = list(modules)
    engines = {k: modules[k] for k in keys if isinstance(modules[k], Engine)}
    scorers = {k: Scorer(modules.pop(k), 1, device, settings.oom) for k in keys}
    runs: dict[tuple, dict[int, list[dict]]] = {k: {} for k in keys}
    for repeat in range(bench.repeats):
        for key, scorer in scorers.items():
            backend, precision = key
            sizes = powers_of_two(bench.max_batch_size) if repeat == 0 else fitting_sizes(runs[key])
            warmup = (max(bench.warmup, 1 if key in engines else 0)) if repeat == 0 else 0
            for batch in sizes:
                run = measure(scorer, batch, size, dev.float_dtype(precision, device), device,
                              repeats=1, warmup=warmup)
                if key in engines and batch in engines[key].builds:
                    run.update(build_s=engines[key].builds[batch]["seconds"], cache=engines[key].builds[batch]["cache"])
                runs[key].setdefault(batch, []).append(run)
                log.info("pass=%d/%d backend=%s precision=%s batch=%d %s", repeat + 1, bench.repeats, backend,
                         precision, batch, "OOM" if run["oom"] else f"images_per_sec={run['images_per_sec']}")
                if run["oom"]:
                    break
    del scorers, engines
    gc.collect()
    dev.empty_cache(device)
    return {k: [median_point(b, r) for b, r in sorted(runs[k].items()) if b <= first_oom(runs[k])] for k in keys}


def fitting_sizes(runs: dict[int, list[dict]]) -> list[int]:
    return [b for b in sorted(runs) if b < first_oom(runs)]


def first_oom(runs: dict[int, list[dict]]) -> float:
    return min((b for b, r in runs.items() if any(x["oom"] for x in r)), default=float("inf"))


def median_point(batch: int, runs: list[dict]) -> dict:
    """One table row from a point's passes: the median time, the largest peak; OOM if any pass ran out."""
    if any(r["oom"] for r in runs):
        return {"batch": batch, "oom": True}
    ms = statistics.median(r["ms_per_batch"] for r in runs)
    point = {"batch": batch, "ms_per_batch": round(ms, 3), "images_per_sec": round(batch * 1000 / ms, 2),
             "peak_mb": max(r["peak_mb"] for r in runs), "oom": False,
             "ms_per_pass": [r["ms_per_batch"] for r in runs]}
    if "build_s" in runs[0]:
        point.update(build_s=runs[0]["build_s"], cache=runs[0]["cache"])
    return point


def format_peaks(report: dict) -> str:
    """Each series' peak and the batch size the sweep would pick; * marks the best series of each back-end."""
    best = {}
    for e in report["series"]:
        peak = max((p for p in e["points"] if not p["oom"]), key=lambda p: p["images_per_sec"], default=None)
        if peak and peak["images_per_sec"] > best.get(e["backend"], (None, 0))[1]:
            best[e["backend"]] = (e["precision"], peak["images_per_sec"])
    lines = ["", f"  {'backend':<12} {'precision':<9} {'peak images/s':>13} {'at batch':>8} {'pick':>5} {'build s':>8}"]
    for e in report["series"]:
        peak = max((p for p in e["points"] if not p["oom"]), key=lambda p: p["images_per_sec"], default=None)
        if peak is None:
            lines.append(f"  {e['backend']:<12} {e['precision']:<9} out of memory at batch 1")
            continue
        mark = "*" if best[e["backend"]][0] == e["precision"] else " "
        built = f"{peak['build_s']:.1f}" if "build_s" in peak else "-"
        lines.append(f"{mark} {e['backend']:<12} {e['precision']:<9} {peak['images_per_sec']:>13.1f} {peak['batch']:>8} "
                     f"{e['recommended'] or '-':>5} {built:>8}")
    return "\n".join(lines)


SWEEP_COLUMNS = ("backend", "precision", "batch", "ms_per_batch", "images_per_sec", "peak_mb", "oom", "recommended",
                 "build_s", "cache")


def write_sweep(report: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        for entry in report["series"]:
            for p in entry["points"]:
                writer.writerow({"backend": entry["backend"], "precision": entry["precision"], "batch": p["batch"],
                                 "build_s": p.get("build_s", ""), "cache": p.get("cache", ""),
                                 "ms_per_batch": p.get("ms_per_batch", ""), "images_per_sec": p.get("images_per_sec", ""),
                                 "peak_mb": p.get("peak_mb", ""), "oom": p["oom"],
                                 "recommended": p["batch"] == entry["recommended"]})
    write_json(report, os.path.join(out_dir, "sweep.json"))
    plot_sweep(report, os.path.join(out_dir, "sweep.png"))

