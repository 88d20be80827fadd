"""Reading the results: the output folder is one dataset for pyarrow, pandas, polars and DuckDB; a folder
holding someone else's Parquet is never overwritten; sample components kept as columns; progress that
reads well in a batch log, and running metrics that `jobs.verify` reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import layouts
from conftest import ROOT, small_jpegs, tiny_settings, verify_output
from pipeline.errors import UserError
from pipeline.runner import score
from pipeline.pack import write_shards


@pytest.fixture(scope="module")
def scored(shards, tmp_path_factory):
    """A finished run over the three test shards (23 rows), logs and metrics included."""
    out = tmp_path_factory.mktemp("scored") / "out"
    assert score(tiny_settings(list(shards), out)) == 0
    (out / "_logs" / "run").mkdir(parents=True)  # as the CLI leaves Hydra's logs
    (out / "_logs" / "run" / "score.log").write_text("log\n")
    expected = sorted((row["shard"], row["key"]) for p in sorted(out.glob("*.parquet"))
                      for row in pq.read_table(p).to_pylist())
    assert len(expected) == 23 and (out / "_metrics").is_dir()
    return out, expected


def test_the_output_folder_reads_as_one_dataset(scored):
    out, expected = scored
    import duckdb
    import pandas as pd
    import polars as pl

    assert sorted(zip(*[pq.read_table(out).column(c).to_pylist() for c in ("shard", "key")])) == expected
    frame = pd.read_parquet(out)
    assert sorted(zip(frame["shard"], frame["key"])) == expected
    lazy = pl.scan_parquet(f"{out}/*.parquet").select("shard", "key").collect()
    assert sorted(lazy.iter_rows()) == expected
    glob_rows = duckdb.sql(f"SELECT shard, key FROM '{out}/*.parquet'").fetchall()
    folder_rows = duckdb.sql(f"SELECT shard, key FROM read_parquet('{out}/**/*.parquet')").fetchall()
    assert sorted(glob_rows) == expected == sorted(folder_rows)  # the _ folders hold no Parquet


def test_scores_join_img2dataset_metadata_by_key(tmp_path):
    """The README's DuckDB example: scores joined with img2dataset's own Parquet of captions and URLs."""
    import duckdb

    (tmp_path / "in").mkdir()
    shard = layouts.img2dataset(str(tmp_path / "in"))
    out = tmp_path / "scores"
    assert score(tiny_settings(shard, out)) == 0
    meta = pa.table({"key": [f"{i:09d}" for i in range(10)], "url": [f"https://example.com/{i}.jpg" for i in range(10)],
                     "caption": [f"a synthetic photo number {i}" for i in range(10)]})
    pq.write_table(meta, tmp_path / "in" / "00000.parquet")
    joined = duckdb.sql(f"""
        SELECT s.key, m.url, s.topk_index[1] AS top1
        FROM '{out}/*.parquet' s JOIN '{tmp_path / "in"}/00000.parquet' m USING (key)
        WHERE s.status = 'ok' ORDER BY s.key""").fetchall()
    assert [row[0] for row in joined] == [f"{i:09d}" for i in range(10)] and joined[3][1].endswith("/3.jpg")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_foreign_parquet_file_is_never_overwritten(tmp_path, overwrite):
    """An img2dataset output folder holds 00000.parquet, the name our 00000.tar would write."""
    (tmp_path / "in").mkdir()
    shard = layouts.img2dataset(str(tmp_path / "in"))
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"key": ["x"], "caption": ["not ours"]}), out / "00000.parquet")
    before = (out / "00000.parquet").read_bytes()
    with pytest.raises(UserError, match="did not write") as error:
        score(tiny_settings(shard, out, overwrite=overwrite))
    assert str(out / "00000.parquet") in str(error.value) and "\n" not in str(error.value)
    assert (out / "00000.parquet").read_bytes() == before
    assert not (out / "_metrics").exists()  # stopped before any work


def test_a_foreign_parquet_file_under_another_name_also_stops_the_run(shards, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / "stats.parquet")
    with pytest.raises(UserError, match="stats.parquet"):
        score(tiny_settings(shards[0], out))
    assert not (out / "part-000000.parquet").exists()


@pytest.mark.parametrize("decoder", ["dali", "torch"])
def test_kept_components_become_string_columns(tmp_path, decoder):
    rng_images = layouts.photos(3, seed=70)
    caption = "une photo, café ☕".encode()
    samples = [
        ("a", {"jpg": layouts.encode(rng_images[0], "JPEG"), "txt": caption, "json": b'{"url": "https://x/a"}'}),
        ("b", {"jpg": layouts.encode(rng_images[1], "JPEG"), "txt": b"bad \xff\xfe bytes", "json": b"{}"}),
        ("c", {"jpg": layouts.encode(rng_images[2], "JPEG"), "json": b'{"no": "caption"}'}),
    ]
    shard = layouts.write_tar(str(tmp_path / "kept.tar"), samples)
    out = tmp_path / "out"
    assert score(tiny_settings(shard, out, decoder=decoder, keep_components=("txt", "json"))) == 0
    table = pq.read_table(out / "kept.parquet")
    assert table.schema.field("txt").type == pa.string() and table.schema.field("json").type == pa.string()
    rows = table.to_pylist()
    assert [r["txt"] for r in rows] == [caption.decode(), "bad \ufffd\ufffd bytes", None]
    assert [r["json"] for r in rows] == ['{"url": "https://x/a"}', "{}", '{"no": "caption"}']
    assert [r["status"] for r in rows] == ["ok"] * 3 and rows[1]["topk_index"] is not None  # kept and scored
    assert rows[0]["error"] is None and "txt is not valid UTF-8 (byte 4)" in rows[1]["error"]


def test_progress_in_a_batch_log_and_running_metrics(tmp_path):
    """stderr to a file (as under Slurm): periodic lines with images/s and ETA, no carriage returns, and
    the rank's metrics file refreshed while the job runs; jobs.verify then says the rank is running."""
    paths = write_shards(small_jpegs(48, seed=71), str(tmp_path / "in"), 12, "slow")
    pattern = os.path.join(os.path.dirname(paths[0]), "slow-*.tar")
    out = tmp_path / "out"
    slow = ["debug=tiny", "model.resize_size=256", "model.crop_size=224", "batch_size=2", "loader.threads=1",
            "progress=true", "log_every_s=0.25"]
    with open(tmp_path / "err.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.score", *slow, f"data.shards={pattern}",
                                 f"output.dir={out}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        running, verify_table = None, ""
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and running is None:
            try:
                metrics = json.loads((out / "_metrics" / "rank-00000.json").read_text())
            except (OSError, ValueError):
                metrics = {}
            if metrics.get("running") and metrics.get("images", 0) > 0:
                running = metrics
                verify_table = verify_output(pattern, out)[1]
            time.sleep(0.2)
        assert proc.wait(timeout=600) == 0
    assert running is not None, "the metrics were not refreshed while the job ran"
    assert running["total_images"] == 48 and running["progress"] and running["eta_seconds"] is not None
    assert "1 running, 0 finished, 0 silent of 1" in verify_table and "ETA" in verify_table
    log = (tmp_path / "err.log").read_text()
    lines = [ln for ln in log.splitlines() if "[progress]" in ln]
    assert len(lines) >= 2 and "\r" not in log
    assert all("rate=" in ln and "/s" in ln and "eta=" in ln and "images=" in ln for ln in lines)
    final = json.loads((out / "_metrics" / "rank-00000.json").read_text())
    assert final["running"] is False and final["images"] == 48


def test_no_progress_means_no_lines(shards, tmp_path, capsys):
    assert score(tiny_settings(shards[0], tmp_path, progress=False, log_every_s=0.01, batch_size=2)) == 0
    err = capsys.readouterr().err
    assert "[progress]" not in err and "\r" not in err


def test_progress_lines_in_process(shards, tmp_path, capsys):
    """The same check's positive side: stderr is not a terminal here, so lines, not a bar."""
    assert score(tiny_settings(shards[0], tmp_path, progress=True, log_every_s=0.01, batch_size=2)) == 0
    err = capsys.readouterr().err
    assert "[progress]" in err and "\r" not in err


@pytest.mark.parametrize("decoder", ["dali", "torch"])
def test_each_back_end_keeps_the_decoder_contract(shards, decoder):
    """Both back-ends are `Decoder`s: fixed-size batches holding every row once, in shard order, then the
    counters the metrics read, still readable after `stop`."""
    import torch

    from pipeline.decode import Decoder, Preprocess, SampleRules, make_decoder
    from pipeline.settings import LoaderSettings, OomSettings
    from pipeline.shard_index import read_index
    from pipeline.shards import open_shard

    opened = [open_shard(p) for p in shards]
    rules = SampleRules(("jpg",), "cls", 10**8)
    preprocess = Preprocess(40, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    d = make_decoder(decoder, opened, rules, preprocess, 8, torch.device("cpu"), torch.float32,
                     LoaderSettings(threads=1), OomSettings())
    assert isinstance(d, Decoder)
    try:
        batches = list(d)
    finally:
        d.stop()
    assert all(b.images.shape == (8, 3, 32, 32) for b in batches)
    keys = [(shard, key) for b in batches for shard, key in zip(b.rows.shards, b.rows.keys)]
    assert keys == [(s.name, k) for s in opened for k in read_index(s.index_path).keys]
    assert (d.fallbacks, d.oom_events, d.reference_decodes) == (0, 0, 0)
