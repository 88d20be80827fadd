"""jobs.report: a self-contained HTML page and a text summary whose numbers match the Parquet files, on
finished runs and runs in progress, with and without topk, labels, embeddings; and at a million rows."""

from __future__ import annotations

import base64
import collections
import json
import os
import re
import struct
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, run_cli
from pipeline.report import Histogram, ReportSettings, write_report
from pipeline.report_page import find_chromium

pytest.importorskip("matplotlib", reason="the report's charts need matplotlib (the bench extra)")

ERRORS = ("decode_error", "empty_image", "too_large", "missing_image", "duplicate_key", "unsupported_format")
CLASSES = 1000
CATEGORIES = pa.array([" ".join([f"class-{i:03d}"] + ["long name"] * (i % 4)) for i in range(CLASSES)])
TOPK = 5


def write_run(folder, shards: int = 4, rows_per_shard: int = 500, seed: int = 0, error_rate: float = 0.05,
              embedding_dim: int = 0, with_labels: bool = True, ranks: int = 2, in_progress: bool = False,
              topk: bool = True, score: bool = False) -> list[str]:
    """A jobs.score output folder built with numpy and pyarrow: `<shard>.parquet` files with the writer's
    columns and metadata, per-rank metrics with a progress history, completion records, `_SUCCESS`.
    In progress: the last quarter of the shards is not written yet, ranks are `running`, no `_SUCCESS`.
    Returns the paths of the shard files written."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "_metrics"), exist_ok=True)
    os.makedirs(os.path.join(folder, "_logs"), exist_ok=True)
    outputs = ([f"topk({TOPK})"] if topk else []) + (["embedding"] if embedding_dim else []) + (["score"] if score else [])
    written = shards - max(1, shards // 4) if in_progress else shards
    paths = []
    for s in range(written):
        name = f"part-{s:06d}"
        table = _shard_table(rng, name, s * rows_per_shard, rows_per_shard, error_rate, embedding_dim, with_labels,
                             topk, score)
        counts = dict(collections.Counter(table.column("status").to_pylist()))
        meta = {"model": "resnet50", "source": "torchvision", "weights": "IMAGENET1K_V2", "precision": "bf16",
                "outputs": outputs, "preprocess": {"resize_size": 232, "crop_size": 224}, "batch_size": 256,
                "version": "0.1.0", "config": {"batch_size": 256}, "rows": rows_per_shard, "status_counts": counts}
        table = table.replace_schema_metadata({b"shardscore": json.dumps(meta).encode()})
        paths.append(os.path.join(folder, f"{name}.parquet"))
        nested = {f.name: hasattr(f.type, "value_type") for f in table.schema}
        floating = [f"{f.name}.list.element" if nested[f.name] else f.name for f in table.schema
                    if pa.types.is_floating(f.type.value_type if nested[f.name] else f.type)]
        pq.write_table(table, paths[-1], compression="zstd", use_dictionary=["shard", "status"],
                       use_byte_stream_split=floating)  # the options of pipeline.writer
    if in_progress:  # a file being written: dot-prefixed, not yet Parquet
        with open(os.path.join(folder, f".part-{written:06d}.parquet.tmp-123"), "wb") as f:
            f.write(b"PAR1 half a file")
    _write_metrics(folder, rng, shards, rows_per_shard, ranks, in_progress)
    return paths


def _shard_table(rng, name, start, n, error_rate, dim, with_labels, topk, score) -> pa.Table:
    ok = rng.random(n) >= error_rate
    kinds = np.where(ok, 0, rng.integers(1, len(ERRORS) + 1, n)).astype(np.int32)
    status = pa.DictionaryArray.from_arrays(pa.array(kinds), pa.array(("ok",) + ERRORS)).cast(pa.string())
    error = pa.DictionaryArray.from_arrays(pa.array(kinds, mask=ok), pa.array(("",) + tuple(f"{e}: details" for e in ERRORS)))
    columns = {
        "key": pc.cast(pa.array(np.arange(start, start + n)), pa.string()),
        "shard": pa.repeat(pa.scalar(name), n),
        "label": pa.array(rng.integers(0, CLASSES, n), mask=rng.random(n) < 0.1),
        "status": status, "error": error.cast(pa.string()),
    }
    mask = pa.array(~ok)
    if topk:
        weights = 1.0 / np.arange(1, CLASSES + 1) ** 1.1  # a few classes dominate, like real data
        first = rng.choice(CLASSES, n, p=weights / weights.sum())
        index = ((first[:, None] + np.arange(TOPK) * 7) % CLASSES).astype(np.int32)
        top1 = rng.beta(4, 1.5, n).astype(np.float32)
        prob = top1[:, None] * (0.5 ** np.arange(TOPK, dtype=np.float32))
        offsets = pa.array(np.arange(0, TOPK * n + 1, TOPK, dtype=np.int32))
        columns["topk_index"] = pa.ListArray.from_arrays(offsets, pa.array(index.reshape(-1)), mask=mask)
        columns["topk_prob"] = pa.ListArray.from_arrays(offsets, pa.array(prob.reshape(-1)), mask=mask)
        if with_labels:
            columns["topk_label"] = pa.ListArray.from_arrays(offsets, CATEGORIES.take(pa.array(index.reshape(-1))), mask=mask)
    if dim:
        scale = rng.uniform(0.6, 1.4, (n, 1)).astype(np.float32) / np.sqrt(dim)
        values = (rng.standard_normal((n, dim), dtype=np.float32) * scale).astype(np.float16)
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=mask)
    if score:
        columns["score"] = pa.array(rng.normal(2.0, 3.0, n).astype(np.float32), mask=~ok)
    return pa.table(columns)


def _write_metrics(folder, rng, shards, rows_per_shard, ranks, in_progress) -> None:
    now = time.time()
    for rank in range(ranks):
        assigned = len(range(rank, shards, ranks))
        total = assigned * rows_per_shard
        rates = np.clip(180 + 15 * rank + rng.normal(0, 12, 20), 1, None)
        rates[:2] *= [0.3, 0.7]  # warm-up
        step = (0.7 if in_progress else 1.0) * total / rates.sum()  # seconds between refreshes
        done = np.concatenate([[0], np.cumsum(rates * step)]).round()
        times = now - step * (len(done) - 1) + step * np.arange(len(done))
        metrics = {"rank": rank, "world_size": ranks, "images": int(done[-1]), "seconds": float(times[-1] - times[0]),
                   "images_per_sec": float(rates.mean()), "sustained_images_per_sec": float(rates[2:].mean()),
                   "batch_size": 256, "precision": "bf16", "device": "cuda:0", "decoder": "dali", "model": "resnet50",
                   "shards_assigned": assigned, "status_counts": {}, "progress": np.c_[times, done].tolist()}
        if in_progress:
            metrics.update(running=True, updated_at=float(times[-1]))
        else:
            metrics.update(running=False, updated_at=float(times[-1]), finished_at=float(times[-1]), exit_code=0,
                           stopped_by=None)
            record = {"rank": rank, "world_size": ranks, "shards": assigned, "done": assigned, "complete": True,
                      "rows": total, "finished_at": float(times[-1])}  # a completion record: not metrics
            with open(os.path.join(folder, "_metrics", f"done-{rank:05d}.json"), "w") as f:
                json.dump(record, f)
        with open(os.path.join(folder, "_metrics", f"rank-{rank:05d}.json"), "w") as f:
            json.dump(metrics, f)
    if not in_progress:
        for name in ("_manifest.json", "_SUCCESS"):
            with open(os.path.join(folder, name), "w") as f:
                json.dump({"complete": True, "shards": shards, "rows": shards * rows_per_shard}, f)


def expected_counts(folder) -> dict:
    """The numbers the report must print, straight from the Parquet files with pyarrow."""
    table = ds.dataset(str(folder), format="parquet").to_table()
    statuses = collections.Counter(table.column("status").to_pylist())
    errors = collections.Counter(s for s, st in zip(table.column("shard").to_pylist(), table.column("status").to_pylist())
                                 if st != "ok")
    column = "topk_label" if "topk_label" in table.column_names else "topk_index"
    classes = collections.Counter()
    if column in table.column_names:
        firsts = pc.list_element(table.column(column).drop_null(), 0)
        classes = collections.Counter(firsts.to_pylist())
    return {"rows": table.num_rows, "statuses": statuses, "errors": errors, "classes": classes, "table": table}


def report(folder, capsys=None, **kw) -> tuple[dict, str]:
    result = write_report(ReportSettings(output_dir=str(folder), **kw))
    return result, capsys.readouterr().out if capsys else ""


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)]


def test_summary_numbers_match_the_parquet_files(tmp_path, capsys):
    write_run(tmp_path, shards=6, rows_per_shard=700, error_rate=0.08, seed=3)
    want = expected_counts(tmp_path)
    result, out = report(tmp_path, capsys)

    assert result["rows"] == want["rows"] == 6 * 700 and result["shards"] == 6
    assert result["status_counts"] == dict(want["statuses"])
    assert list(result["status_counts"])[0] == "ok"
    worst = sorted(want["errors"].items(), key=lambda x: (-x[1], x[0]))
    assert [(s, n) for s, n, _ in result["shard_errors"]] == worst
    for shard, n, kinds in result["shard_errors"]:
        assert sum(kinds.values()) == n
    top = sorted(want["classes"].items(), key=lambda x: (-x[1], x[0]))[:20]
    assert [tuple(c) for c in result["top_classes"]] == top and result["class_column"] == "topk_label"
    assert result["top1_prob"]["values"] == want["statuses"]["ok"]

    assert f"rows     {want['rows']} in 6 shards: ok={want['statuses']['ok']}" in out
    for status, n in want["statuses"].items():
        assert f"{status}={n}" in out
    assert " ".join(f"{s}={n}" for s, n in worst) in out
    assert " ".join(f"{c}={n}" for c, n in top[:5]) in out
    assert "complete (_SUCCESS), 6 of 6 shards written" in out
    assert "resnet50 (torchvision, weights IMAGENET1K_V2) bf16, batch 256" in out and "shardscore 0.1.0" in out


def test_page_is_self_contained_with_embedded_charts(tmp_path, capsys):
    write_run(tmp_path, embedding_dim=32)
    result, _ = report(tmp_path, capsys)
    page = open(result["html"], encoding="utf-8").read()
    assert result["html"] == os.path.join(str(tmp_path), "_report", "index.html")
    pngs = images(page)
    assert len(pngs) == 4  # top classes, top-1 probability, embedding norms, images/s
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    width, height = struct.unpack(">II", pngs[0][16:24])
    assert width > 300 and height > 200
    for section in ("Rows by status", "Shards with the most error rows", "Top predicted classes",
                    "Top-1 probability", "Embedding L2 norm", "Images/s per rank"):
        assert f"<h2>{section}</h2>" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from anywhere
    assert sorted(os.listdir(tmp_path / "_report")) == ["index.html"]


def test_embedding_norms_histogram(tmp_path, capsys):
    write_run(tmp_path, shards=3, embedding_dim=48, seed=5)
    result, _ = report(tmp_path, capsys, bins=40)
    want = expected_counts(tmp_path)["table"].column("embedding").drop_null().combine_chunks()
    norms = np.linalg.norm(want.flatten().to_numpy().astype(np.float32).reshape(-1, 48), axis=1)
    hist = result["embedding_norm"]
    assert hist["values"] == len(norms) == sum(hist["counts"])
    assert hist["edges"][0] <= norms.min() and norms.max() <= hist["edges"][-1]
    width = hist["edges"][1] - hist["edges"][0]
    counts = np.bincount(np.clip(((norms - hist["edges"][0]) / width).astype(int), 0, len(hist["counts"]) - 1),
                         minlength=len(hist["counts"]))
    assert np.abs(counts - hist["counts"]).sum() <= 8  # the same bins, up to rounding at an edge
    assert 20 <= len(hist["counts"]) <= 40


def test_histogram_range_grows_to_hold_every_value():
    rng = np.random.default_rng(0)
    hist, seen = Histogram(10), []
    for lo, hi in ((5, 6), (4, 7), (0.5, 20), (5, 5)):
        values = rng.uniform(lo, hi, 1000)
        hist.add(values)
        seen.append(values)
    result, seen = hist.result(), np.concatenate(seen)
    assert result["values"] == seen.size == sum(result["counts"])
    assert result["edges"][0] <= seen.min() and seen.max() <= result["edges"][-1]
    assert 5 <= len(result["counts"]) <= 10


def test_scalar_score_without_topk(tmp_path, capsys):
    write_run(tmp_path, topk=False, score=True, with_labels=False, error_rate=0.1)
    result, out = report(tmp_path, capsys)
    page = open(result["html"], encoding="utf-8").read()
    assert result["top_classes"] == [] and result["top1_prob"] is None and result["class_column"] is None
    assert result["score"]["values"] == expected_counts(tmp_path)["statuses"]["ok"]
    assert "<h2>Score</h2>" in page and "Top predicted classes" not in page and "classes  " not in out


def test_class_index_when_no_labels(tmp_path, capsys):
    write_run(tmp_path, with_labels=False)
    want = expected_counts(tmp_path)["classes"]
    result, _ = report(tmp_path, capsys, top_classes=7)
    assert result["class_column"] == "topk_index"
    assert [tuple(c) for c in result["top_classes"]] == sorted(want.items(), key=lambda x: (-x[1], x[0]))[:7]


def test_run_in_progress(tmp_path, capsys):
    write_run(tmp_path, shards=8, ranks=2, in_progress=True)
    result, out = report(tmp_path, capsys)
    assert result["state"] == "in progress" and result["shards"] == 6
    assert "in progress: 2 of 2 ranks running, 6 of 8 shards written" in out
    assert result["rows"] == expected_counts(tmp_path)["rows"]
    assert all(s["running"] and len(s["rates"]) == 20 for s in result["ranks"])
    assert "in progress" in open(result["html"], encoding="utf-8").read()


def test_ranks_without_progress_history(tmp_path, capsys):
    write_run(tmp_path, ranks=2)
    for rank in range(2):
        path = tmp_path / "_metrics" / f"rank-{rank:05d}.json"
        metrics = json.loads(path.read_text())
        del metrics["progress"], metrics["running"], metrics["updated_at"]  # the metrics of today's runs
        path.write_text(json.dumps(metrics))
    result, out = report(tmp_path, capsys)
    assert [len(s["rates"]) for s in result["ranks"]] == [1, 1]
    assert f"rank 0 {result['ranks'][0]['rates'][0]:.1f} images/s" in out


def test_cli_writes_only_the_report(tmp_path):
    write_run(tmp_path, shards=2)
    before = {p for p in tmp_path.rglob("*")}
    r = run_cli("jobs.report", f"output.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "report   " in r.stdout and "rows     1000 in 2 shards" in r.stdout
    assert {p for p in tmp_path.rglob("*")} - before == {tmp_path / "_report", tmp_path / "_report" / "index.html"}


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_no_output_is_one_error_line(tmp_path, case):
    folder = tmp_path / "out"
    if case == "empty":
        folder.mkdir()
        (folder / "_metrics").mkdir()
    r = run_cli("jobs.report", f"output.dir={folder}")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: output.dir") and "Traceback" not in r.stderr
    assert case == "empty" or not folder.exists()


def test_the_reading_jobs_do_not_import_torch():
    """Report, verify and select take their names from pipeline.layout and their rule from
    pipeline.completeness: none of them waits seconds for torch to import."""
    code = "import sys, pipeline.report, pipeline.verify, pipeline.select; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_screenshot_with_chromium(tmp_path, capsys):
    if not find_chromium():
        if os.environ.get("SHARDSCORE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("SHARDSCORE_REQUIRE_CHROMIUM=1 but neither chromium nor chromium-browser is on PATH")
        pytest.skip("no chromium or chromium-browser on PATH")
    from PIL import Image

    write_run(tmp_path / "run", embedding_dim=16)
    png = tmp_path / "shot" / "report.png"
    result, out = report(tmp_path / "run", capsys, screenshot=str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out
    with Image.open(png) as image:
        assert image.width == 1200 and image.height > 600
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or range(1 << 20)) > 50


def test_a_million_rows(tmp_path, capsys):
    """100 shards x 10,000 rows with top-5 and a 64-wide embedding; the seconds are for docs/BENCHMARKS.md."""
    write_run(tmp_path, shards=100, rows_per_shard=10_000, embedding_dim=64, with_labels=False, error_rate=0.02)
    started = time.perf_counter()
    result, _ = report(tmp_path, capsys)
    seconds = time.perf_counter() - started
    table = ds.dataset(str(tmp_path), format="parquet").to_table(columns=["status"])
    statuses = collections.Counter(table.column("status").to_pylist())
    assert result["rows"] == 1_000_000 and result["status_counts"] == dict(statuses)
    assert result["embedding_norm"]["values"] == result["top1_prob"]["values"] == statuses["ok"]
    assert sum(n for _, n in result["top_classes"]) <= statuses["ok"]
    with capsys.disabled():
        print(f"\njobs.report over 1,000,000 rows (100 shards, topk 5, embedding 64): {seconds:.2f} s")
