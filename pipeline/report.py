"""`jobs.report`: one self-contained HTML page about a run's output folder (rows by status, the shards
with the most error rows, predicted classes, top-1 probability, embedding norms, each rank's images/s
over time) and a short text summary.

One pass over the shard files reads only the columns it draws, batch by batch, into fixed-size
aggregates (counts, histograms), so tens of millions of rows cost the memory of one batch. A run still
in progress works too: its committed shards and its ranks' refreshed metrics. The page is one file with
its charts embedded, readable offline; headless Chromium can render it to a PNG.
"""

from __future__ import annotations

import collections
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.bench.report import pyplot
from pipeline.completeness import stored_metadata
from pipeline.errors import UserError
from pipeline.layout import MANIFEST, REPORT_PAGE, SUCCESS, OutputLayout, is_url, metrics_file
from pipeline.report_page import CHROMIUMS, find_chromium, render_html, screenshot

SHARDS_LISTED = 10  # shards with the most error rows


@dataclass(frozen=True)
class ReportSettings:
    """Which output folder to report on, and how much to draw."""

    output_dir: str
    top_classes: int = 20  # bars in the predicted-classes chart
    bins: int = 50  # bins of each histogram
    screenshot: str | None = None  # also render the page to this PNG with headless Chromium

    def __post_init__(self):
        if not self.output_dir:
            raise UserError("output.dir is required")
        if self.top_classes < 1 or self.bins < 2:
            raise UserError("report.top_classes must be >= 1 and report.bins >= 2")


class Histogram:
    """Equal bins over a fixed range, or over one that doubles until it holds every value seen: one pass
    and fixed memory for values whose range is not known in advance (embedding norms, scores)."""

    def __init__(self, bins: int, lo: float | None = None, hi: float | None = None):
        self.bins, self.fixed = bins, lo is not None
        # Adaptive: 8x finer inside (an even count, so pairs merge), to show about `bins` however it grew.
        self.counts = np.zeros(bins if self.fixed else 8 * bins, np.int64)
        self.lo, self.width = lo, None if lo is None else (hi - lo) / len(self.counts)

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if not values.size:
            return
        low, high, n = float(values.min()), float(values.max()), len(self.counts)
        if self.lo is None:
            self.lo, self.width = low, max(high - low, abs(low) * 1e-3, 1e-6) / n
        while not self.fixed and (low < self.lo or high > self.lo + self.width * n):
            merged = self.counts.reshape(-1, 2).sum(axis=1)  # double the width, extend towards the outlier
            left = low < self.lo
            self.counts = np.concatenate([np.zeros_like(merged), merged] if left else [merged, np.zeros_like(merged)])
            self.lo -= self.width * n if left else 0.0
            self.width *= 2
        self.counts += np.bincount(np.clip(((values - self.lo) / self.width).astype(np.int64), 0, n - 1), minlength=n)

    def result(self) -> dict | None:
        """About `bins` bin edges and counts (an adaptive range without the empty bins at either end)."""
        filled = np.flatnonzero(self.counts)
        if not filled.size:
            return None
        first, last = (0, len(self.counts)) if self.fixed else (filled[0], filled[-1] + 1)
        group = -(-(last - first) // self.bins)
        counts = np.pad(self.counts[first:last], (0, -(last - first) % group)).reshape(-1, group).sum(axis=1)
        return {"edges": (self.lo + self.width * (first + group * np.arange(len(counts) + 1))).tolist(),
                "counts": counts.tolist(), "values": int(self.counts.sum())}


def scan(files: list[str], bins: int, models: list[str | None] = (None,), filesystem=None) -> dict:
    """Status counts per shard, and per model (None: the one-model form's unprefixed columns) its top-1
    class counts and histograms over every row, a batch at a time."""
    fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=["shard", "status"]))
    dataset = ds.dataset(files, format=fmt, filesystem=filesystem)
    names = set(dataset.schema.names)
    if not {"shard", "status"} <= names:
        raise UserError(f"{files[0]} has no shard and status columns: not an output of jobs.score")
    per_model = {model: _ModelScan(f"{model}_" if model else "", names, bins) for model in models}
    columns = ["shard", "status", *(c for m in per_model.values() for c in m.columns)]
    by_shard: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    rows = 0
    width = sum(dataset.schema.field(m.embedding).type.list_size for m in per_model.values() if m.embedding)
    batch_rows = max(1024, min(1 << 17, (8 << 20) // max(1, width)))  # wide embeddings: ~32 MB of float32
    for batch in dataset.to_batches(columns=columns, batch_size=batch_rows, batch_readahead=4, fragment_readahead=2):
        rows += batch.num_rows
        _count_statuses(by_shard, batch.column("shard"), batch.column("status"))
        for m in per_model.values():
            m.add(batch)
    return {"rows": rows, "by_shard": by_shard, "models": {model: m.result() for model, m in per_model.items()}}


class _ModelScan:
    """One model's columns (`prefix` + topk_label | topk_index, topk_prob, embedding, score) over the batches."""

    def __init__(self, prefix: str, names: set, bins: int):
        self.class_column = next((prefix + c for c in ("topk_label", "topk_index") if prefix + c in names), None)
        self.prob, self.embedding, self.score = (prefix + c if prefix + c in names else None
                                                 for c in ("topk_prob", "embedding", "score"))
        self.columns = [c for c in (self.class_column, self.prob, self.embedding, self.score) if c]
        self.classes: collections.Counter = collections.Counter()
        self.hists = {"top1_prob": Histogram(bins, 0.0, 1.0), "embedding_norm": Histogram(bins), "score": Histogram(bins)}

    def add(self, batch: pa.RecordBatch) -> None:
        if self.class_column and self.class_column.endswith("topk_label"):
            values, starts = _first_elements(batch.column(self.class_column))
            counts = pc.value_counts(values.take(pa.array(starts)))
            self.classes.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
        elif self.class_column:
            values, starts = _first_elements(batch.column(self.class_column))
            found, counts = np.unique(values.to_numpy()[starts], return_counts=True)
            self.classes.update(dict(zip(found.tolist(), counts.tolist())))
        if self.prob:
            values, starts = _first_elements(batch.column(self.prob))
            self.hists["top1_prob"].add(values.to_numpy()[starts])
        if self.embedding:
            self.hists["embedding_norm"].add(_norms(batch.column(self.embedding)))
        if self.score:
            self.hists["score"].add(batch.column(self.score).drop_null().to_numpy().astype(np.float32))

    def result(self) -> dict:
        return {"classes": self.classes, "class_column": self.class_column,
                **{name: h.result() for name, h in self.hists.items()}}


def _count_statuses(by_shard: dict, shard: pa.Array, status: pa.Array) -> None:
    shard, status = (a if pa.types.is_dictionary(a.type) else pc.dictionary_encode(a) for a in (shard, status))
    n = len(status.dictionary)
    counts = np.bincount(shard.indices.to_numpy().astype(np.int64) * n + status.indices.to_numpy())
    for code in np.flatnonzero(counts):
        by_shard[shard.dictionary[code // n].as_py()][status.dictionary[code % n].as_py()] += int(counts[code])


def _first_elements(lists: pa.ListArray) -> tuple[pa.Array, np.ndarray]:
    """The list values and, for every non-empty list, the position of its first element among them."""
    offsets = lists.offsets.to_numpy()
    keep = (np.diff(offsets) > 0) & lists.is_valid().to_numpy(zero_copy_only=False)
    return lists.values, offsets[:-1][keep]


def _norms(embedding: pa.FixedSizeListArray) -> np.ndarray:
    """The L2 norm of every non-null row, in float32 (float16 squares overflow)."""
    matrix = embedding.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    matrix = matrix.reshape(-1, embedding.type.list_size)
    return np.sqrt(np.einsum("ij,ij->i", matrix, matrix))


def current_metrics(layout: OutputLayout) -> list[dict]:
    """Each rank's `_metrics/rank-*.json` of the newest run's world size, by rank."""
    found = layout.read_rank_files(metrics_file)
    world = max(found, key=_updated).get("world_size") if found else None
    return sorted((m for m in found if m.get("world_size") == world), key=lambda m: m.get("rank", 0))


def _updated(metrics: dict) -> float:
    return metrics.get("updated_at") or metrics.get("finished_at") or 0.0


def _read_json(layout: OutputLayout, name: str) -> dict:
    try:
        return layout.read_json(name)
    except (OSError, ValueError):  # not there, being replaced right now, or damaged
        return {}


def run_identity(layout: OutputLayout, files: list[str], metrics: list[dict]) -> dict:
    """Model, precision, batch size and version from the newest shard file's metadata, else the metrics."""
    meta, _ = layout.read_footer(layout.newest(files))
    stored = stored_metadata(meta) if meta is not None else {}
    latest = max(metrics, key=_updated) if metrics else {}
    keys = ("model", "source", "weights", "precision", "batch_size", "outputs", "version", "models")
    return {key: stored.get(key, latest.get(key)) for key in keys}


def model_stats(metrics: list[dict]) -> list[dict]:
    """Per model of a several-model run, over the ranks: its smallest micro-batch and its OOM events."""
    stats: dict[str, dict] = {}
    for m in metrics:
        for name, s in (m.get("models") or {}).items():
            seen = stats.setdefault(name, {"model": name, "min_micro_batch": s["min_micro_batch"], "oom_events": 0,
                                           "ranks": 0, "written": s.get("written", True)})
            seen["min_micro_batch"] = min(seen["min_micro_batch"], s["min_micro_batch"])
            seen["oom_events"] += s["oom_events"]
            seen["ranks"] += 1
    return list(stats.values())


def engine_stats(metrics: list[dict]) -> list[dict]:
    """Per model run by an engine, over the ranks: back-end, precision, what scored (the engine, or eager
    after a failed gate, on how many ranks), the gate's weakest figures, and builds against cache hits."""
    stats: dict[str, dict] = {}
    for m in metrics:
        for name, s in (m.get("engines") or {}).items():
            seen = stats.setdefault(name, {"model": name, "backend": s["backend"], "precision": s["precision"],
                                           "ranks": 0, "eager_ranks": 0, "gate": {}, "built": 0, "hits": 0})
            seen["ranks"] += 1
            seen["eager_ranks"] += s["scoring_with"] == "eager"
            for gate in s["gates"].values():
                for key, value in gate.items():
                    if key not in ("rows", "passed"):
                        seen["gate"][key] = min(value, seen["gate"].get(key, value))
            for build in s["builds"].values():
                seen["built" if build["cache"] == "built" else "hits"] += 1
    return list(stats.values())


def run_state(layout: OutputLayout, metrics: list[dict], written: int) -> tuple[str, str]:
    """("in progress" | "complete" | "incomplete", one line saying so)."""
    running = [m for m in metrics if m.get("running")]
    world = metrics[0].get("world_size", len(metrics)) if metrics else None
    expected = _read_json(layout, MANIFEST).get("shards") or (
        sum(m.get("shards_assigned", 0) for m in metrics) if metrics and len(metrics) == world else None)
    shards = f"{written} of {expected} shards written" if expected else f"{written} shards written"
    if running:
        age = time.time() - max(_updated(m) for m in running)
        return "in progress", f"in progress: {len(running)} of {world} ranks running, {shards}, last update {age:.0f} s ago"
    if layout.exists(SUCCESS):
        return "complete", f"complete (_SUCCESS), {shards}"
    return "incomplete", f"incomplete: no _SUCCESS and no rank running, {shards} (jobs.verify says what is missing)"


def rank_rates(metrics: list[dict]) -> list[dict]:
    """Per rank, images/s over time: between consecutive `progress` points, else its sustained rate at its end."""
    series = []
    for m in metrics:
        points = np.asarray(m.get("progress") or [], dtype=np.float64).reshape(-1, 2)
        dt, dn = np.diff(points[:, 0]), np.diff(points[:, 1])
        times, rates = points[1:, 0][dt > 0], dn[dt > 0] / dt[dt > 0]
        if not len(times) and m.get("finished_at") and m.get("sustained_images_per_sec") is not None:
            times, rates = np.array([m["finished_at"]]), np.array([m["sustained_images_per_sec"]])
        if len(times):
            start = points[0, 0] if len(points) else times[0] - m.get("seconds", 0)
            running = bool(m.get("running"))
            now = rates[-1] if running or m.get("sustained_images_per_sec") is None else m["sustained_images_per_sec"]
            series.append({"rank": m.get("rank", 0), "start": float(start), "times": times.tolist(),
                           "rates": rates.tolist(), "running": running, "images_per_sec": float(now)})
    return series


def write_report(settings: ReportSettings) -> dict:
    """Write `<output.dir>/_report/index.html` (and the screenshot, if asked for), print a short summary,
    and return the numbers it printed."""
    out = settings.output_dir
    if not is_url(out) and not os.path.isdir(out):
        raise UserError(f"output.dir {out} does not exist")
    chromium = find_chromium() if settings.screenshot else None
    if settings.screenshot and not chromium:
        raise UserError(f"report.screenshot needs Chromium: none of {', '.join(CHROMIUMS)} is on PATH")
    pyplot()  # matplotlib is an optional extra: say so before any work
    layout = OutputLayout(out, create=False)
    files = layout.shard_files()
    if not files:
        raise UserError(f"output.dir {out} holds no shard Parquet files (<shard>.parquet) yet")
    metrics = current_metrics(layout)
    identity = run_identity(layout, files, metrics)
    sources = [layout.arrow_source(name) for name in files]
    found = scan([path for path, _ in sources], settings.bins, list(identity.get("models") or [None]), sources[0][1])
    state, detail = run_state(layout, metrics, len(files))
    statuses = sum(found["by_shard"].values(), collections.Counter())
    errors = {s: sum(n for k, n in c.items() if k != "ok") for s, c in found["by_shard"].items()}
    worst = sorted(((s, n) for s, n in errors.items() if n), key=lambda x: (-x[1], x[0]))[:SHARDS_LISTED]
    result = {
        "output_dir": out, "html": layout.path(REPORT_PAGE), "screenshot": settings.screenshot,
        "state": state, "state_detail": detail, "identity": identity,
        "rows": found["rows"], "shards": len(files),
        "status_counts": dict(sorted(statuses.items(), key=lambda x: (x[0] != "ok", -x[1], x[0]))),
        "shard_errors": [[s, n, {k: v for k, v in sorted(found["by_shard"][s].items()) if k != "ok"}] for s, n in worst],
        "models": [{"name": name, "class_column": m["class_column"],
                    "top_classes": sorted(m["classes"].items(), key=lambda x: (-x[1], str(x[0])))[:settings.top_classes],
                    **{key: m[key] for key in ("top1_prob", "embedding_norm", "score")}}
                   for name, m in found["models"].items()],
        "model_stats": model_stats(metrics),
        "engine_stats": engine_stats(metrics),
        "ranks": rank_rates(metrics),
    }
    if list(found["models"]) == [None]:  # the one-model form: its charts' figures at the top level too
        result.update({k: v for k, v in result["models"][0].items() if k != "name"})
    page = render_html(result).encode()
    layout.write_bytes(REPORT_PAGE, page, sync=False)  # atomic: a browser showing the page never reads half of it
    if chromium:
        with tempfile.TemporaryDirectory() as folder:  # Chromium reads a local copy (the page may be in S3)
            local = os.path.join(folder, "index.html")
            with open(local, "wb") as f:
                f.write(page)
            screenshot(chromium, local, settings.screenshot)
    print(format_summary(result), flush=True)
    return result


def format_summary(r: dict) -> str:
    ident = r["identity"]
    lines = [f"report   {r['html']}" + (f" (screenshot {r['screenshot']})" if r["screenshot"] else ""),
             f"run      {r['state_detail']}",
             (f"model    {ident['model']} ({ident['source']}, weights {ident['weights']}) {ident['precision']}, batch "
              f"{ident['batch_size']}, outputs {'+'.join(ident['outputs'] or [])}, shardscore {ident['version']}"
              if not ident.get("models") else
              "models   " + ", ".join(f"{name} ({m['model']}, {'+'.join(m['outputs'])})" for name, m in ident["models"].items())
              + f"; {ident['precision']}, batch {ident['batch_size']}, shardscore {ident['version']}"),
             f"rows     {r['rows']} in {r['shards']} shards: "
             + " ".join(f"{k}={v}" for k, v in r["status_counts"].items()),
             "errors   " + (" ".join(f"{s}={n}" for s, n, _ in r["shard_errors"]) + " (shards with most error rows)"
                            if r["shard_errors"] else "none")]
    for m in r["models"]:
        if m["top_classes"]:
            lines.append(f"classes  {' '.join(f'{c}={n}' for c, n in m['top_classes'][:5])} (top-1 by "
                         f"{m['class_column']}[0], {min(5, len(m['top_classes']))} of {len(m['top_classes'])} in the page)")
    lines.append("ranks    " + (", ".join(f"rank {s['rank']} {s['images_per_sec']:.1f} images/s "
                                          + ("(latest, running)" if s["running"] else "(sustained)")
                                          for s in r["ranks"]) or "no metrics yet"))
    return "\n".join(lines)
