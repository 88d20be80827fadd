"""Nothing lost: bad samples become error rows, bad shards are reported, kills and signals resume."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, small_jpegs, tiny_settings, verify_output
from corrupt import write_corrupt_shard, write_good_only_shard
from pipeline.errors import EXIT_REQUEUE
from pipeline.pack import write_shards
from pipeline.runner import Runner, StopSignals, plan, score
from pipeline.shards import open_shard
from pipeline.settings import DataSettings, ModelSettings, OutputSettings, ScoreSettings

MAX_PIXELS = 300 * 300  # the fixture's "huge" image is 400×400


def run_library(shard, out, decoder):
    settings = ScoreSettings(
        data=DataSettings(shards=shard, max_pixels=MAX_PIXELS), output=OutputSettings(dir=str(out)), outputs=("topk", "scores", "embedding"),
        model=ModelSettings(name="resnet18", weights=None, resize_size=40, crop_size=32),
        batch_size=8, precision="fp32", decoder=decoder, progress=False)
    code = score(settings)
    return code, pq.read_table(out / f"{os.path.basename(shard)[:-4]}.parquet").to_pylist()


@pytest.mark.parametrize("decoder", ["dali", "torch"])
def test_every_bad_sample_becomes_an_error_row(tmp_path, decoder):
    expected = write_corrupt_shard(str(tmp_path / "bad.tar"))
    write_good_only_shard(str(tmp_path / "good.tar"))
    code, rows = run_library(str(tmp_path / "bad.tar"), tmp_path / "out-bad", decoder)
    assert code == 0
    assert [(r["key"], r["status"]) for r in rows] == expected
    for r in rows:
        assert (r["error"] is None) == (r["status"] == "ok")
        assert (r["topk_index"] is None) == (r["scores"] is None) == (r["embedding"] is None) == (r["status"] != "ok")
        assert r["error"] is None or "\n" not in r["error"]
    _, clean = run_library(str(tmp_path / "good.tar"), tmp_path / "out-good", decoder)
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["key"] for r in ok] == [r["key"] for r in clean]
    np.testing.assert_allclose([r["scores"] for r in ok], [r["scores"] for r in clean], atol=1e-2)
    assert [r["topk_index"] for r in ok] == [r["topk_index"] for r in clean]


def test_bad_shards_are_reported_and_the_rest_scored(shards, tmp_path, caplog):
    truncated = tmp_path / "broken.tar"
    data = open(shards[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    missing = tmp_path / "gone.tar"
    out = tmp_path / "out"
    caplog.set_level("INFO")
    assert score(tiny_settings([shards[1], str(truncated), str(missing)], out)) == 1
    assert (out / "part-000001.parquet").exists()
    assert not (out / "broken.parquet").exists() and not (out / "gone.parquet").exists()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert set(manifest["failed"]) == {"broken", "gone"} and not manifest["complete"]
    assert "truncated" in manifest["failed"]["broken"] and "no such file" in manifest["failed"]["gone"]
    assert not (out / "_SUCCESS").exists()
    assert "shard failed shard=" in caplog.text


def test_a_compressed_shard_that_fails_while_being_read(shards, tmp_path):
    """The index is fine but the gzip stream is damaged half-way: the shard gets no Parquet, the others do."""
    bad = tmp_path / "damaged.tar.gz"
    with open(shards[0], "rb") as src, gzip.open(bad, "wb") as dst:
        dst.write(src.read())
    assert open_shard(str(bad)).count == 9  # indexed while intact
    data = bytearray(bad.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    bad.write_bytes(data)
    os.utime(bad.with_suffix("").with_suffix(".idx"))  # the index stays newer than the shard: reused as is
    out = tmp_path / "out"
    assert score(tiny_settings([shards[2], str(bad)], out, decoder="torch")) == 1
    assert not (out / "damaged.parquet").exists() and (out / "part-000002.parquet").exists()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert set(manifest["failed"]) == {"damaged"} and not manifest["complete"]
    assert not (out / "_SUCCESS").exists()


@pytest.mark.parametrize("decoder", ["dali", "torch"])
def test_a_shard_that_vanishes_after_planning(shards, tmp_path, decoder):
    """Indexed and counted, then gone before it is read: that shard is failed, the ones around it scored."""
    folder = tmp_path / "in"
    folder.mkdir()
    for p in shards:
        shutil.copy(p, folder)
        shutil.copy(p[:-4] + ".idx", folder)
    settings = ScoreSettings(data=DataSettings(shards=str(folder / "part-*.tar")), output=OutputSettings(dir=str(tmp_path / "out")),
                             model=ModelSettings(name="resnet18", weights=None, resize_size=40, crop_size=32),
                             batch_size=4, precision="fp32", decoder=decoder, progress=False)
    planned = plan(settings)
    os.remove(folder / "part-000001.tar")
    with StopSignals() as signals:
        assert Runner(planned).run(signals) == 1
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-000000.parquet", "part-000002.parquet"]
    assert pq.read_metadata(out / "part-000002.parquet").num_rows == 5
    manifest = json.loads((out / "_manifest.json").read_text())
    assert list(manifest["failed"]) == ["part-000001"] and manifest["shards_done"] == 2


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("six")
    return write_shards(small_jpegs(36, seed=5), str(out), shard_size=6, prefix="six")


# Slow enough (224 px, batch 2) that the tests can catch the run between shards.
SLOW = ["debug=tiny", "model.resize_size=256", "model.crop_size=224", "batch_size=2", "loader.threads=1"]
PATTERN = "six-{000000..000005}.tar"


def slow_settings(six_shards, out):
    """SLOW, in-process (the rerun after a kill need not be a process of its own)."""
    from pipeline.settings import LoaderSettings

    return tiny_settings(os.path.join(os.path.dirname(six_shards[0]), PATTERN), out, resize_size=256, crop_size=224,
                         batch_size=2, loader=LoaderSettings(threads=1))


def start(six_shards, out):
    pattern = os.path.join(os.path.dirname(six_shards[0]), PATTERN)
    return subprocess.Popen([sys.executable, "-m", "jobs.score", *SLOW, f"data.shards={pattern}", f"output.dir={out}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def done_shards(out) -> int:
    return len([p for p in os.listdir(out) if p.endswith(".parquet")]) if os.path.isdir(out) else 0


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def rows_of(out):
    return sorted((r["shard"], r["key"], tuple(r["topk_index"]))
                  for p in sorted(os.listdir(out)) if p.endswith(".parquet")
                  for r in pq.read_table(os.path.join(out, p)).to_pylist())


@pytest.fixture(scope="module")
def uninterrupted(six_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    assert score(slow_settings(six_shards, out)) == 0
    return rows_of(out)


@pytest.mark.parametrize("kill_after", [0, 1, 3])
def test_sigkill_then_rerun_is_exactly_once(six_shards, uninterrupted, tmp_path, kill_after):
    out = tmp_path / "out"
    proc = start(six_shards, out)
    if kill_after == 0:
        assert wait_for(lambda: os.path.isdir(out / "_logs"), proc)
    else:
        assert wait_for(lambda: done_shards(out) >= kill_after, proc)
    proc.kill()
    proc.wait()
    assert done_shards(out) < 6, "the run finished before it could be killed"
    assert score(slow_settings(six_shards, out)) == 0  # the rerun
    assert [p for p in os.listdir(out) if ".tmp-" in p] == []
    assert rows_of(out) == uninterrupted
    complete, table = verify_output(os.path.join(os.path.dirname(six_shards[0]), PATTERN), out)
    assert complete, table
    assert "duplicate" not in table and "missing  " not in table


def test_sigterm_stops_cleanly_and_resumes(six_shards, uninterrupted, tmp_path, caplog):
    out = tmp_path / "out"
    proc = start(six_shards, out)
    assert wait_for(lambda: done_shards(out) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_REQUEUE, log[-2000:]
    assert time.time() - sent < 15
    assert "shard(s) remain" in log
    stopped_at = done_shards(out)
    assert stopped_at >= 1, "SIGTERM came after the first shard was written, which must stay written"
    assert stopped_at < 6, "every shard was written: the run did not stop at SIGTERM"
    for p in os.listdir(out):
        if p.endswith(".parquet"):
            assert pq.read_metadata(out / p).num_rows == 6  # complete shards only, never half of one
    assert [p for p in os.listdir(out) if ".tmp-" in p] == []
    metrics = json.loads((out / "_metrics" / "rank-00000.json").read_text())
    assert metrics["stopped_by"] == "SIGTERM" and len(metrics["shards_remaining"]) == 6 - stopped_at
    caplog.set_level("INFO")
    assert score(slow_settings(six_shards, out)) == 0
    assert f"{stopped_at} shard(s) already complete" in caplog.text
    assert rows_of(out) == uninterrupted


def test_a_shard_whose_file_cannot_be_written_is_failed_and_the_rest_written(shards, tmp_path, monkeypatch):
    """The disk is full when one shard's file is put in place: that shard is failed with the reason, the
    others are written, and its temporary file is removed."""
    real_replace = os.replace

    def replace(src, dst, **kw):
        if str(dst).endswith("part-000001.parquet"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    settings = ScoreSettings(data=DataSettings(shards=shards), output=OutputSettings(dir=str(out)),
                             model=ModelSettings(name="resnet18", weights=None, resize_size=40, crop_size=32),
                             batch_size=4, precision="fp32", decoder="dali", progress=False)
    assert score(settings) == 1
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-000000.parquet", "part-000002.parquet"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert list(manifest["failed"]) == ["part-000001"]
    assert "cannot write its Parquet file" in manifest["failed"]["part-000001"]
    assert "No space left" in manifest["failed"]["part-000001"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
