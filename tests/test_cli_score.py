"""End to end through the real CLI: both decoders, batch sizes that do and do not divide the data."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from conftest import TINY, run_cli
from pipeline.shards import read_index

DECODERS = ["dali", "torch"]


def input_keys(paths):
    return {(os.path.basename(p)[:-4], key) for p in paths for key in read_index(p[:-4] + ".idx").keys}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_every_sample_scored_once(shards, tmp_path, decoder, batch_size):
    out = tmp_path / "out"
    r = run_cli("jobs.score", *TINY, f"data.shards={os.path.dirname(shards[0])}/part-{{000000..000002}}.tar",
                f"output.dir={out}", f"decoder={decoder}", f"batch_size={batch_size}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "images/s sustained" in r.stdout

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
    assert metrics["batches"] == -(-23 // batch_size)
    for key in ("seconds", "images_per_sec", "sustained_images_per_sec", "precision", "device"):
        assert key in metrics
    assert set(metrics["time_split_seconds"]) == {"input", "model", "write"}
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == 23


def test_overrides_reach_metadata_and_metrics(shards, tmp_path):
    out = tmp_path / "out"
    r = run_cli("jobs.score", *TINY, f"data.shards={shards[2]}", f"output.dir={out}",
                "batch_size=3", "precision=bf16", "model.topk=2", "decoder=torch")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads(pq.read_schema(out / "part-000002.parquet").metadata[b"shardscore"])
    assert meta["batch_size"] == 3 and meta["precision"] == "bf16" and meta["model"] == "resnet18"
    assert meta["config"]["batch_size"] == 3 and "version" in meta
    metrics = json.loads((out / "_metrics" / "rank-00000.json").read_text())
    assert metrics["batch_size"] == 3 and metrics["precision"] == "bf16"
    assert pq.read_table(out / "part-000002.parquet").column("topk_index").to_pylist()[0].__len__() == 2


def test_rerun_skips_complete_shards(shards, tmp_path):
    out = tmp_path / "out"
    args = [*TINY, f"data.shards=[{shards[0]},{shards[1]}]", f"output.dir={out}", "decoder=torch"]
    assert run_cli("jobs.score", *args).returncode == 0
    before = os.path.getmtime(out / "part-000000.parquet")
    r = run_cli("jobs.score", *args)
    assert r.returncode == 0
    assert "2 shard(s) already complete" in r.stdout + r.stderr
    assert os.path.getmtime(out / "part-000000.parquet") == before
    metrics = json.loads((out / "_metrics" / "rank-00000.json").read_text())
    assert metrics["images"] == 0 and metrics["shards_skipped_complete"] == 2
