"""`jobs.bench`: how fast is the model alone (mode=sweep), and how close does the whole job get to its
ceilings (mode=e2e, measured in `pipeline.bench_e2e`)? Settings, the sweep, and both modes' tables,
files and plots live here.

The sweep times the model on fixed random inputs of the model's input size at batch 1, 2, 4 … for each
precision, with `pipeline.autobatch.measure`: warm-up excluded, the clock read after the device has
finished. Unlike `batch_size=auto`, which times one point after the other, it makes several passes over
all points and reports each point's median, so a shared machine's drift hits every point alike. The
first out-of-memory size ends a precision and is marked, not fatal.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import os
import statistics
from dataclasses import dataclass, field

import torch

from pipeline import device as dev
from pipeline.autobatch import format_table, measure, powers_of_two, recommend
from pipeline.errors import EXIT_FAILED, EXIT_OK, UserError
from pipeline.model import load_model
from pipeline.scorer import Scorer
from pipeline.settings import PRECISIONS, ScoreSettings

log = logging.getLogger(__name__)

MODES = ("sweep", "e2e")
VARIANTS = ("naive", "dataloader", "score_dali", "score_torch", "decode_only", "model_only")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class E2ESettings:
    """mode=e2e: which variants, how many rounds, over how many images."""

    variants: tuple[str, ...] = VARIANTS
    rounds: int = 3
    images: int | None = None  # None: every image of data.shards; N: the leading whole shards holding >= N
    workers: int = 2  # DataLoader workers of the `dataloader` variant

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        _check(not unknown and len(self.variants) > 0,
               f"bench.e2e.variants must be a non-empty list of {', '.join(VARIANTS)}; got {list(self.variants)}")
        _check(self.rounds >= 1, "bench.e2e.rounds must be >= 1")
        _check(self.images is None or self.images >= 1, "bench.e2e.images must be >= 1 or null")
        _check(self.workers >= 0, "bench.e2e.workers must be >= 0")


@dataclass(frozen=True)
class BenchSettings:
    """The `bench:` node of conf/bench.yaml."""

    out_dir: str
    max_batch_size: int = 256
    precisions: tuple[str, ...] = ("fp32", "auto")
    repeats: int = 5
    warmup: int = 1
    tolerance: float = 0.03
    e2e: E2ESettings = field(default_factory=E2ESettings)

    def __post_init__(self):
        _check(bool(self.out_dir), "bench.out_dir is required")
        _check(self.max_batch_size >= 1, "bench.max_batch_size must be >= 1")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        _check(not bad and len(self.precisions) > 0,
               f"bench.precisions must be a non-empty list of {', '.join(PRECISIONS)}; got {list(self.precisions)}")
        _check(self.repeats >= 1, "bench.repeats must be >= 1")
        _check(self.warmup >= 0, "bench.warmup must be >= 0")
        _check(0 <= self.tolerance < 1, "bench.tolerance must be in [0, 1)")


def run_bench(mode: str, settings: ScoreSettings, bench: BenchSettings) -> int:
    """Run one benchmark mode, print its table, write its files under bench.out_dir; returns the exit code."""
    _check(mode in MODES, f"mode must be one of {'|'.join(MODES)}, got {mode!r}")
    os.makedirs(bench.out_dir, exist_ok=True)
    if mode == "sweep":
        report = run_sweep(settings, bench)
        return EXIT_OK if all(p["recommended"] is not None for p in report["precisions"]) else EXIT_FAILED
    from pipeline.bench_e2e import run_e2e

    run_e2e(settings, bench)
    return EXIT_OK


def resolve_precisions(names, device: torch.device) -> dict[str, list[str]]:
    """{resolved precision: the requested names that mean it}, in request order: `auto` that resolves to
    a precision already listed is measured once."""
    resolved: dict[str, list[str]] = {}
    for name in names:
        resolved.setdefault(dev.resolve_precision(name, device), []).append(name)
    return resolved


def run_sweep(settings: ScoreSettings, bench: BenchSettings) -> dict:
    """Sweep batch sizes for every precision; prints a table per precision and writes sweep.{csv,json,png}."""
    device = dev.resolve_device(settings.device)
    dev.configure(device, settings.seed)
    m = settings.model
    precisions = resolve_precisions(bench.precisions, device)
    for precision, requested in precisions.items():
        if requested != [precision]:
            log.info("precision=%s stands for %s on %s", precision, "+".join(requested), device)
    report = {
        "mode": "sweep", "model": m.path or m.name, "image_size": m.crop_size, "device": dev.describe(device),
        "max_batch_size": bench.max_batch_size, "repeats": bench.repeats, "warmup": bench.warmup,
        "tolerance": bench.tolerance,
        "peak_memory": "CUDA max allocated" if device.type == "cuda" else "process peak RSS during the point",
        "precisions": [],
    }
    for precision, points in sweep_points(settings, bench, device, list(precisions)).items():
        chosen = recommend(points, bench.tolerance)
        ok = [p for p in points if not p["oom"]]
        best = max(ok, key=lambda p: p["images_per_sec"])["batch"] if ok else None
        report["precisions"].append({"precision": precision, "requested": precisions[precision],
                                     "recommended": chosen, "best_batch": best, "points": points})
        verdict = (f"recommended batch_size={chosen} (smallest within {bench.tolerance:.0%} of the best images/s)"
                   if chosen else "no batch size fits: out of memory at batch 1")
        print(f"\n{report['model']} {m.crop_size}px precision={precision} on {report['device']}:\n"
              f"{format_table(points, chosen)}\n{verdict}", flush=True)
    write_sweep(report, bench.out_dir)
    print(f"wrote {', '.join(os.path.join(bench.out_dir, f) for f in ('sweep.csv', 'sweep.json', 'sweep.png'))}",
          flush=True)
    return report


def sweep_points(settings: ScoreSettings, bench: BenchSettings, device: torch.device,
                 precisions: list[str]) -> dict[str, list[dict]]:
    """{precision: points for batch 1, 2, 4 … ending at the first out-of-memory size}.

    bench.repeats passes, each timing every (precision, batch) point once, so the drift of a shared
    machine hits every point alike; a point is the median of its passes. The first pass finds the sizes
    that fit (after bench.warmup untimed runs per point); later passes re-time those.
    """
    scorers = {p: Scorer(load_model(settings.model, device, dev.DTYPES[p], settings.seed).module, 1, 1, False,
                         device, settings.oom) for p in precisions}
    runs: dict[str, dict[int, list[dict]]] = {p: {} for p in precisions}
    for repeat in range(bench.repeats):
        for precision, scorer in scorers.items():
            sizes = powers_of_two(bench.max_batch_size) if repeat == 0 else fitting_sizes(runs[precision])
            for batch in sizes:
                run = measure(scorer, batch, settings.model.crop_size, dev.DTYPES[precision], device,
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


def write_json(data: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def pyplot():
    """matplotlib's pyplot on the file-only Agg back-end (no display on a compute node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(report: dict, path: str) -> None:
    """images/s against batch size (log2), one line per precision; the recommendation starred, OOM crossed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    sizes = sorted({p["batch"] for e in report["precisions"] for p in e["points"]})
    for entry in report["precisions"]:
        ok = [p for p in entry["points"] if not p["oom"]]
        line, = ax.plot([p["batch"] for p in ok], [p["images_per_sec"] for p in ok], marker="o", label=entry["precision"])
        chosen = next((p for p in ok if p["batch"] == entry["recommended"]), None)
        if chosen:
            ax.plot(chosen["batch"], chosen["images_per_sec"], marker="*", markersize=16, color=line.get_color(),
                    markeredgecolor="black", linestyle="none")
            ax.annotate(f"recommended {chosen['batch']}", (chosen["batch"], chosen["images_per_sec"]),
                        textcoords="offset points", xytext=(6, -14), fontsize=8)
        for p in entry["points"]:
            if p["oom"]:
                ax.plot(p["batch"], 0, marker="x", markersize=10, color=line.get_color(), linestyle="none")
                ax.annotate("OOM", (p["batch"], 0), textcoords="offset points", xytext=(-10, 6), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (model alone)")
    ax.set_title(f"{report['model']} {report['image_size']}px, {report['device']}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="precision")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_e2e_table(report: dict) -> str:
    lines = [f"{'variant':<12} | {'images/s':>9} | {'whole run':>9} | {'x score':>7} | per round"]
    for name, v in report["variants"].items():
        ratio = f"{v['ratio_to_score']:.2f}" if "ratio_to_score" in v else "-"
        rounds = " ".join(f"{r['sustained_images_per_sec']:.1f}" for r in v["rounds"])
        lines.append(f"{name:<12} | {v['images_per_sec']:>9.1f} | {v['whole_run_images_per_sec']:>9.1f} | "
                     f"{ratio:>7} | {rounds}")
    bound = report["bound"]
    if bound:
        ratio = f"{bound['ratio_to_score']:.2f}" if "ratio_to_score" in bound else "-"
        lines.append(f"{'bound':<12} | {bound['images_per_sec']:>9.1f} | {'':>9} | {ratio:>7} | {bound['rule']}")
    if report["score_to_bound"] is not None:
        lines.append(f"jobs.score ({report['reference']}) reaches {report['score_to_bound']:.0%} of the "
                     f"decode+model bound")
    return "\n".join(lines)


def plot_e2e(report: dict, path: str) -> None:
    """One bar per variant (images/s, median; whiskers span the rounds), the bound as a dashed line."""
    plt = pyplot()
    names = list(report["variants"])
    values = [report["variants"][n]["images_per_sec"] for n in names]
    lows = [v - min(r["sustained_images_per_sec"] for r in report["variants"][n]["rounds"]) for n, v in zip(names, values)]
    highs = [max(r["sustained_images_per_sec"] for r in report["variants"][n]["rounds"]) - v for n, v in zip(names, values)]
    colors = ["tab:blue" if n.startswith("score_") else "tab:gray" if n.endswith("_only") else "tab:orange"
              for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(names) + 1.6), dpi=100)
    ax.barh(names, values, xerr=[lows, highs], color=colors, capsize=3)
    for i, (v, high) in enumerate(zip(values, highs)):
        ax.annotate(f"{v:.1f}", (v + high, i), textcoords="offset points", xytext=(6, -3), fontsize=8)
    if report["bound"]:
        ax.axvline(report["bound"]["images_per_sec"], color="black", linestyle="--",
                   label=f"bound {report['bound']['images_per_sec']:.1f} = {report['bound']['rule']}")
        ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s (median over rounds)")
    ax.set_title(f"{report['model']} {report['image_size']}px {report['precision']} batch {report['batch_size']}, "
                 f"{report['images']} images, {report['device']}", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
