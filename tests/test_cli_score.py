"""End to end: both decoders, batch sizes that do and do not divide the data, windows of shards; the real
CLI where the process itself is what is tested (overrides, what it prints)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from conftest import TINY, run_cli
from pipeline.runner import score
from pipeline.settings import DaliSettings, DataSettings, LoaderSettings, ModelSettings, OutputSettings, ScoreSettings
from pipeline.shard_index import read_index

DECODERS = ["dali", "torch"]


def input_keys(paths):
    return {(os.path.basename(p)[:-4], key) for p in paths for key in read_index(p[:-4] + ".idx").keys}


def tiny(shards, out, **kw) -> ScoreSettings:
    """debug=tiny as settings: resnet18, random weights, 72→64 px, fp32."""
    return ScoreSettings(data=DataSettings(shards=shards), output=OutputSettings(dir=str(out)),
                         model=ModelSettings(name="resnet18", weights=None, resize_size=72, crop_size=64),
                         batch_size=16, precision="fp32", progress=False, **kw)


def check_output(out, shards, batch_size, decoder):
    tables = [pq.read_table(out / f"part-{i:06d}.parquet") for i in range(3)]
    rows = [row for t in tables for row in t.to_pylist()]
    got = [(row["shard"], row["key"]) for row in rows]
    assert len(got) == len(set(got)) == 23  # no duplicates, no padding rows
    assert set(got) == input_keys(shards)
    assert all(row["status"] == "ok" and row["error"] is None for row in rows)
    assert all(row["label"] == int(row["key"]) % 10 for row in rows)
    assert all(len(row["topk_index"]) == 5 and abs(sum(row["topk_prob"])) <= 1.0 + 1e-5 for row in rows)
    # Output order inside a shard follows the input order.
    assert [r["key"] for r in tables[0].to_pylist()] == read_index(shards[0][:-4] + ".idx").keys

    metrics = json.loads((out / "_metrics" / "rank-00000.json").read_text())
    assert metrics["images"] == 23 and metrics["batch_size"] == batch_size and metrics["decoder"] == decoder
    assert metrics["batches"] == -(-23 // batch_size)  # fixed batches: padding only in the last one
    for key in ("seconds", "images_per_sec", "sustained_images_per_sec", "precision", "device"):
        assert key in metrics
    assert set(metrics["time_split_seconds"]) == {"input", "model", "write"}
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == 23
    return rows


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_every_sample_scored_once(shards, tmp_path, decoder, batch_size):
    assert score(replace(tiny(shards, tmp_path, decoder=decoder), batch_size=batch_size)) == 0
    check_output(tmp_path, shards, batch_size, decoder)


@pytest.mark.dali
@pytest.mark.parametrize("window_rows", [1, 10])
def test_windows_of_shards_give_the_same_rows_without_padding_mid_run(shards, tmp_path, window_rows):
    """One DALI reader per window (here one shard, or two); the short last batch of a window is stitched
    to the next window's first, so batches stay full until the end."""
    assert score(replace(tiny(shards, tmp_path / "one", decoder="dali"), batch_size=7)) == 0
    loader = LoaderSettings(dali=DaliSettings(window_rows=window_rows, mmap=window_rows == 1))
    assert score(replace(tiny(shards, tmp_path / "windows", decoder="dali"), batch_size=7, loader=loader)) == 0
    rows = check_output(tmp_path / "windows", shards, 7, "dali")
    one = [r for i in range(3) for r in pq.read_table(tmp_path / "one" / f"part-{i:06d}.parquet").to_pylist()]
    assert [r["topk_index"] for r in rows] == [r["topk_index"] for r in one]


def test_the_cli_scores_prints_the_rate_and_applies_overrides(shards, tmp_path):
    out = tmp_path / "out"
    r = run_cli("jobs.score", *TINY, f"data.shards={os.path.dirname(shards[0])}/part-{{000000..000002}}.tar",
                f"output.dir={out}", "batch_size=3", "precision=bf16", "model.topk=2", "decoder=torch")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "images/s sustained" in r.stdout
    meta = json.loads(pq.read_schema(out / "part-000002.parquet").metadata[b"shardscore"])
    assert meta["batch_size"] == 3 and meta["precision"] == "bf16" and meta["model"] == "resnet18"
    assert meta["config"]["batch_size"] == 3 and "version" in meta
    metrics = json.loads((out / "_metrics" / "rank-00000.json").read_text())
    assert metrics["batch_size"] == 3 and metrics["precision"] == "bf16" and metrics["images"] == 23
    assert pq.read_table(out / "part-000002.parquet").column("topk_index").to_pylist()[0].__len__() == 2


def test_rerun_skips_complete_shards_and_keeps_the_real_runs_metrics(shards, tmp_path, caplog):
    settings = tiny([shards[0], shards[1]], tmp_path, decoder="torch")
    assert score(settings) == 0
    before = os.path.getmtime(tmp_path / "part-000000.parquet")
    first = json.loads((tmp_path / "_metrics" / "rank-00000.json").read_text())
    caplog.set_level("INFO")
    assert score(settings) == 0
    assert "2 shard(s) already complete" in caplog.text
    assert os.path.getmtime(tmp_path / "part-000000.parquet") == before
    metrics = json.loads((tmp_path / "_metrics" / "rank-00000.json").read_text())
    assert metrics == first and metrics["images"] == 18 and metrics["sustained_images_per_sec"] > 0
    assert json.loads((tmp_path / "_SUCCESS").read_text())["rows"] == 18
