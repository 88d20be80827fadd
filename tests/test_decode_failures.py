"""DALI decode failures: a bad image costs only itself (bisection), and an out-of-memory error in the
decoder is retried on the same images, never written as a bad image. The out-of-memory errors are
real torch.OutOfMemoryError raised where DALI's output becomes a torch tensor (oom.inject_decode_above),
in the same code path a real one takes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import small_jpegs
from corrupt import write_corrupt_shard
from pipeline.errors import OutOfMemoryAtOneRow
from pipeline.pack import encode_jpeg, synthetic_image, write_shards
from pipeline.runner import score
from pipeline.settings import DataSettings, ModelSettings, OomSettings, OutputSettings, ScoreSettings

MAX_PIXELS = 300 * 300


def run(shard, out, batch_size=8, inject=None):
    settings = ScoreSettings(
        data=DataSettings(shards=shard, max_pixels=MAX_PIXELS), output=OutputSettings(dir=str(out)), outputs=("topk", "scores"),
        model=ModelSettings(name="resnet18", weights=None, resize_size=40, crop_size=32),
        batch_size=batch_size, precision="fp32", decoder="dali", progress=False,
        oom=OomSettings(inject_decode_above=inject))
    code = score(settings)
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return code, rows, json.loads((out / "_metrics" / "rank-00000.json").read_text())


@pytest.fixture(scope="module")
def good_shard(tmp_path_factory):
    return write_shards(small_jpegs(20, seed=9), str(tmp_path_factory.mktemp("good")), 20, "good")[0]


def test_decoder_out_of_memory_retries_the_same_images(good_shard, tmp_path):
    code, clean, _ = run(good_shard, tmp_path / "clean")
    assert code == 0
    code, rows, metrics = run(good_shard, tmp_path / "oom", inject=3)  # batches of 8 → 4 → 2 fit
    assert code == 0 and metrics["decode_oom_events"] >= 2
    assert [r["status"] for r in rows] == ["ok"] * 20  # no good image written as decode_error
    np.testing.assert_allclose([r["scores"] for r in rows], [r["scores"] for r in clean], atol=1e-2)


def test_out_of_memory_with_a_bad_image_in_the_batch(tmp_path):
    expected = write_corrupt_shard(str(tmp_path / "bad.tar"))
    _, clean, _ = run(str(tmp_path / "bad.tar"), tmp_path / "clean")
    code, rows, metrics = run(str(tmp_path / "bad.tar"), tmp_path / "oom", inject=2)
    assert code == 0 and metrics["decode_oom_events"] >= 1
    assert [(r["key"], r["status"]) for r in rows] == expected == [(r["key"], r["status"]) for r in clean]


def test_out_of_memory_on_a_single_image_stops_the_run(good_shard, tmp_path):
    with pytest.raises(OutOfMemoryAtOneRow, match="decoding a single image"):
        run(good_shard, tmp_path / "out", inject=0)
    assert not list((tmp_path / "out").glob("*.parquet"))  # nothing written as a bad image


def test_one_truncated_jpeg_costs_only_itself(tmp_path):
    rng = np.random.default_rng(3)
    samples = [(f"{i:03d}", {"jpg": encode_jpeg(synthetic_image(rng, 50, 90))}) for i in range(16)]
    data = samples[11][1]["jpg"]
    samples[11] = ("011", {"jpg": data[: len(data) * 2 // 3]})  # the header is intact; the scan is cut
    shard = write_shards(iter(samples), str(tmp_path / "in"), 16, "cut")[0]
    code, rows, metrics = run(shard, tmp_path / "out", batch_size=16)
    assert code == 0
    assert [r["key"] for r in rows if r["status"] != "ok"] == ["011"]
    assert rows[11]["status"] == "decode_error" and rows[11]["topk_index"] is None
    assert metrics["dali_fallback_batches"] == 1
