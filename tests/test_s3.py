"""Shards and output in S3-compatible storage, against a real S3 API server (moto's server mode on
127.0.0.1, started here); `pipe:` and http shards through the torch decoder."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, TINY, run_cli, small_jpegs, tiny_settings, verify_output
from pipeline.bench.storage import LocalS3
from pipeline.pack import write_shards
from pipeline.runner import score

pytest.importorskip("moto")
pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint with bucket `data` holding three shards under in/; yields the environment to use."""
    with LocalS3("data") as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            local = write_shards(small_jpegs(20, seed=61), str(tmp_path_factory.mktemp("s3in")), 7, "part")
            server.upload(local, "in")
            yield {"env": server.env, "fs": server.fs, "local": local}
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def rows(folder) -> list[tuple]:
    return sorted((r["shard"], r["key"], r["status"], tuple(r["topk_index"] or ()))
                  for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist())


@pytest.fixture(scope="module")
def local_rows(s3, tmp_path_factory):
    """The rows of the same shards read from local disk, per decoder (the two resample a little apart)."""
    found = {}

    def of(decoder: str) -> list[tuple]:
        if decoder not in found:
            out = tmp_path_factory.mktemp(f"local-{decoder}")
            assert score(tiny_settings(list(s3["local"]), out, decoder=decoder)) == 0
            found[decoder] = rows(out)
        return found[decoder]

    return of


@pytest.mark.parametrize("decoder, spec", [("dali", "s3://data/in/part-{000000..000002}.tar"),
                                           ("torch", "s3://data/in/part-*.tar"),
                                           ("auto", "s3://data/in/part-*.tar")])
def test_both_decoders_read_s3_shards(s3, local_rows, tmp_path, decoder, spec, caplog):
    out = tmp_path / "out"
    caplog.set_level("INFO")
    assert score(tiny_settings(spec, out, decoder=decoder, index_cache_dir=str(tmp_path / "idx"))) == 0
    assert rows(out) == local_rows("dali" if decoder == "dali" else "torch")  # auto streams object storage: torch
    assert ("using decoder=torch" in caplog.text) == (decoder == "auto")
    assert len(list((tmp_path / "idx").glob("part-000000-*.idx"))) == 1  # the index sits in the local cache


def test_output_in_s3_is_whole_objects_and_verifies(s3, local_rows, tmp_path):
    fs, url = s3["fs"], "s3://data/out-verify"
    args = ["data.shards=s3://data/in/part-*.tar", f"output.dir={url}", f"data.index_cache_dir={tmp_path / 'idx'}"]
    r = run_cli("jobs.score", *TINY, *args, env=s3["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    fs.invalidate_cache()
    names = sorted(p.split("/", 2)[2] for p in fs.find("data/out-verify"))
    assert [n for n in names if n.endswith(".parquet")] == ["part-000000.parquet", "part-000001.parquet",
                                                             "part-000002.parquet"]
    assert "_SUCCESS" in names and "_manifest.json" in names and "_metrics/rank-00000.json" in names
    assert not [n for n in names if n.startswith("_logs") or ".tmp-" in n]  # Hydra's logs stay local
    table = pq.read_table("data/out-verify", filesystem=fs)  # one dataset: the _ names are skipped
    assert sorted((r["shard"], r["key"], r["status"], tuple(r["topk_index"] or ())) for r in table.to_pylist()) \
        == local_rows("torch")  # decoder=auto streams object storage with the torch decoder
    complete, table = verify_output("s3://data/in/part-*.tar", url)
    assert complete, table
    assert os.path.isdir(os.path.join(ROOT, "outputs", "logs", "data", "out-verify"))  # ./outputs/logs/<bucket>/<prefix>


def test_report_verify_and_select_on_an_s3_output(s3, tmp_path):
    """The reading jobs work on an s3:// output as on a folder: jobs.report writes its page into it,
    jobs.verify checks it, jobs.select writes a keep-list and new shards into S3."""
    import tarfile

    import webdataset as wds

    fs, url = s3["fs"], "s3://data/out-read"
    r = run_cli("jobs.score", *TINY, "data.shards=s3://data/in/part-*.tar", f"output.dir={url}",
                f"data.index_cache_dir={tmp_path / 'idx'}", env=s3["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("jobs.report", f"output.dir={url}", env=s3["env"])
    assert r.returncode == 0, r.stderr
    assert "rows     20 in 3 shards" in r.stdout and f"{url}/_report/index.html" in r.stdout
    fs.invalidate_cache()
    assert fs.cat_file("data/out-read/_report/index.html").startswith(b"<!DOCTYPE html>")
    r = run_cli("jobs.verify", "data.shards=s3://data/in/part-*.tar", f"output.dir={url}", "verify.workers=2",
                f"data.index_cache_dir={tmp_path / 'idx'}", env=s3["env"])
    assert r.returncode == 0 and "done 3" in r.stdout and r.stdout.strip().endswith("complete"), r.stdout + r.stderr
    keys = [f"{i:06d}" for i in range(20)]
    pq.write_table(pa.table({"key": keys, "width": [100 + i for i in range(20)]}), tmp_path / "meta.parquet")
    fs.put(str(tmp_path / "meta.parquet"), "data/meta/meta.parquet")
    r = run_cli("jobs.select", f"output.dir={url}", "where=status = 'ok' AND key <> '000004' AND width > 0",
                "join=s3://data/meta/*.parquet", "keep_list=s3://data/sel/keep.parquet", "reshard.dir=s3://data/sel/new",
                "reshard.shard_size=6",
                f"data.index_cache_dir={tmp_path / 'idx'}", env=s3["env"])
    assert r.returncode == 0, r.stderr
    fs.invalidate_cache()
    keep = pq.read_table("data/sel/keep.parquet", filesystem=fs)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("data/sel/new"))
    assert names == ["_SUCCESS", "_selection.parquet"] + [f"shard-{i:06d}.{e}" for i in range(4) for e in ("idx", "tar")]
    local = tmp_path / "new"
    fs.get("data/sel/new/", str(local), recursive=True)
    got = {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
           for s in wds.WebDataset(sorted(str(p) for p in local.glob("*.tar")), shardshuffle=False, empty_check=False)}
    originals: dict = {}
    for path in s3["local"]:
        with tarfile.open(path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                originals.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert sorted(got) == sorted(keep.column("key").to_pylist()) == sorted(k for k in originals if k != "000004")
    assert all(got[k] == originals[k] for k in got)


SLOW = ["debug=tiny", "model.resize_size=256", "model.crop_size=224", "batch_size=2", "loader.threads=1"]


def test_resume_after_sigkill_with_remote_output(s3, tmp_path):
    fs, url = s3["fs"], "s3://data/out-kill"
    six = write_shards(small_jpegs(24, seed=62), str(tmp_path / "six"), 4, "six")
    pattern = os.path.join(os.path.dirname(six[0]), "six-*.tar")
    cmd = [sys.executable, "-m", "jobs.score", *SLOW, f"data.shards={pattern}", f"output.dir={url}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **s3["env"]}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        if fs.exists("data/out-kill") and any(p.endswith(".parquet") for p in fs.ls("data/out-kill")):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fs.invalidate_cache()
    assert len([p for p in fs.ls("data/out-kill") if p.endswith(".parquet")]) < 6, "finished before the kill"
    from pipeline.settings import LoaderSettings

    rerun = tiny_settings(pattern, url, resize_size=256, crop_size=224, batch_size=2, loader=LoaderSettings(threads=1))
    assert score(rerun) == 0
    fs.invalidate_cache()
    table = pq.read_table("data/out-kill", filesystem=fs)
    keys = [(r["shard"], r["key"]) for r in table.to_pylist()]
    assert len(keys) == len(set(keys)) == 24  # exactly one row per key
    complete, table = verify_output(pattern, url)
    assert complete, table


def test_a_changed_object_is_indexed_again(s3, tmp_path):
    fs = s3["fs"]
    fs.put(s3["local"][0], "data/change/part-000000.tar")
    settings = tiny_settings("s3://data/change/part-000000.tar", tmp_path / "out", index_cache_dir=str(tmp_path / "idx"))
    assert score(settings) == 0
    assert pq.read_metadata(tmp_path / "out" / "part-000000.parquet").num_rows == 7
    other = write_shards(small_jpegs(5, seed=63), str(tmp_path / "other"), 5, "part")[0]
    fs.put(other, "data/change/part-000000.tar")  # same name, new content
    assert score(settings) == 0
    assert len(list((tmp_path / "idx").glob("part-000000-*.idx"))) == 2
    assert pq.read_metadata(tmp_path / "out" / "part-000000.parquet").num_rows == 5  # redone by the one rule


def test_pipe_and_http_shards_through_the_torch_decoder(s3, local_rows, tmp_path, caplog):
    folder = os.path.dirname(s3["local"][0])
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=folder, **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        names = [os.path.basename(p) for p in s3["local"]]
        specs = {"pipe": [f"pipe:cat {os.path.join(folder, n)}" for n in names],
                 "http": [f"http://127.0.0.1:{server.server_port}/{n}" for n in names]}
        for kind, spec in specs.items():
            listing = tmp_path / f"{kind}.txt"
            listing.write_text("\n".join(spec) + "\n")
            out = tmp_path / kind
            caplog.set_level("INFO")
            assert score(tiny_settings(str(listing), out, index_cache_dir=str(tmp_path / "idx"))) == 0
            assert "decoder=torch" in caplog.text
            assert rows(out) == local_rows("torch")
    finally:
        server.shutdown()


def test_staged_s3_shards_are_decoded_by_dali_with_bounded_disk(s3, local_rows, tmp_path):
    """data.stage_dir: decoder=auto reads object storage with DALI from staged local copies, at most
    stage_ahead shards on disk at a time, none left afterwards."""
    stage = tmp_path / "stage"
    (stage / f"shardscore-{socket.gethostname()}-999999999").mkdir(parents=True)  # what a killed run left
    (stage / "shardscore-othernode-999999999").mkdir()  # another node's run, sharing the folder: kept
    settings = tiny_settings("s3://data/in/part-*.tar", tmp_path / "out", stage_dir=str(stage), stage_ahead=2,
                             index_cache_dir=str(tmp_path / "idx"))
    assert score(settings) == 0
    assert rows(tmp_path / "out") == local_rows("dali")
    metrics = json.loads((tmp_path / "out" / "_metrics" / "rank-00000.json").read_text())
    assert metrics["decoder"] == "dali"
    assert metrics["staged"]["shards"] == 3 and 1 <= metrics["staged"]["peak_shards_on_disk"] <= 2
    assert [p.name for p in stage.iterdir()] == ["shardscore-othernode-999999999"]  # the rest removed
