"""jobs.select: a predicate over real scores (jobs.score's output) joined with metadata, the keep-list, and
new shards read back by webdataset and by jobs.score byte for byte; kills and reruns; refusing
incomplete scores; errors a user can make."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, TINY, run_cli, small_jpegs, tiny_settings
from pipeline.pack import write_shards
from pipeline.runner import score
from pipeline.shard_index import check_not_truncated, create_index, read_index, split_key

pytestmark = pytest.mark.xdist_group("select")


def samples(count: int, seed: int, start: int = 0):
    """JPEG, label, json and txt components, as img2dataset writes them."""
    for key, parts in small_jpegs(count, seed, start):
        meta = json.dumps({"key": key, "caption": f"picture {key}"}).encode()
        yield key, {**parts, "json": meta, "txt": f"picture {key}".encode()}


def long_name_shard(folder: str) -> str:
    """A shard whose members carry pax headers (names longer than ustar's 100 bytes)."""
    path = os.path.join(folder, "part-000003.tar")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, parts in samples(4, seed=8, start=900):
            key = f"{'deep/' * 22}{key}"
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    create_index(path, path[:-4] + ".idx")
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Four shards (one with pax headers) scored by jobs.score, and img2dataset-style metadata."""
    root = tmp_path_factory.mktemp("select")
    paths = write_shards(samples(30, seed=3), str(root / "shards"), 10, "part") + [long_name_shard(str(root / "shards"))]
    r = run_cli("jobs.score", *TINY, f"data.shards=[{','.join(paths)}]", f"output.dir={root / 'scores'}",
                "output.keep_components=[txt]")
    assert r.returncode == 0, r.stderr
    originals = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                originals[member.name] = tar.extractfile(member).read()
    keys = sorted({split_key(name)[0] for name in originals})
    width = {k: 100 + 37 * i % 900 for i, k in enumerate(keys)}
    os.makedirs(root / "meta")
    pq.write_table(pa.table({"key": keys, "width": [width[k] for k in keys], "caption": [f"c {k}" for k in keys],
                             "status": ["success"] * len(keys)}), root / "meta" / "part.parquet")
    return {"root": root, "paths": paths, "scores": root / "scores", "originals": originals, "width": width}


def score_rows(folder) -> dict[str, dict]:
    return {r["key"]: r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}


def expected_keys(scored, threshold: float, min_width: int) -> list[str]:
    """The predicate computed here, in Python, from the score files and the metadata."""
    rows = score_rows(scored["scores"])
    return sorted(k for k, r in rows.items() if r["status"] == "ok" and r["topk_prob"][0] > threshold
                  and scored["width"][k] > min_width)


def read_back(folder) -> dict[str, dict[str, bytes]]:
    """Every sample of the new shards by key: {ext: bytes}, through webdataset (and each shard's index
    checked against a fresh listing of its tar)."""
    import webdataset as wds

    tars = sorted(str(p) for p in folder.glob("*.tar"))
    for tar in tars:
        check_not_truncated(tar, read_index(tar[:-4] + ".idx").end)
        create_index(tar, tar + ".check")
        assert open(tar + ".check").read() == open(tar[:-4] + ".idx").read()
        os.remove(tar + ".check")
    found: dict[str, dict[str, bytes]] = {}
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        assert key not in found, f"{key} twice"
        found[key] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return found


def median_prob(scored) -> float:
    probs = sorted(r["topk_prob"][0] for r in score_rows(scored["scores"]).values() if r["topk_prob"])
    return probs[len(probs) // 3]


def test_select_by_score_and_metadata_then_read_the_new_shards_back(scored, tmp_path):
    threshold = median_prob(scored)
    want = expected_keys(scored, threshold, 300)
    assert 5 < len(want) < 30
    keep, new = tmp_path / "keep.parquet", tmp_path / "new"
    r = run_cli("jobs.select", f"output.dir={scored['scores']}", f"where=topk_prob[1] > {threshold} AND width > 300",
                f"join={scored['root'] / 'meta' / '*.parquet'}", f"keep_list={keep}", f"reshard.dir={new}",
                "reshard.shard_size=4")
    assert r.returncode == 0, r.stderr
    assert f"{len(want)} kept" in r.stdout and "shard(s) written" in r.stdout
    table = pq.read_table(keep)
    assert table.column_names == ["key", "shard"] and sorted(table.column("key").to_pylist()) == want
    meta = json.loads(pq.read_metadata(keep).metadata[b"shardscore"])
    assert meta["where"] == f"topk_prob[1] > {threshold} AND width > 300" and meta["rows_kept"] == len(want)
    assert meta["rows_scanned"] == 34 and meta["identity"]["model"] == "resnet18"
    assert sorted(os.listdir(new)) == sorted(["_SUCCESS", "_selection.parquet"]
                                             + [f"shard-{i:06d}.{e}" for i in range(-(-len(want) // 4)) for e in ("tar", "idx")])
    found = read_back(new)
    assert sorted(found) == want
    for key, parts in found.items():  # every component, byte for byte, and nothing else
        assert parts == {split_key(n)[1]: v for n, v in scored["originals"].items() if split_key(n)[0] == key}
    out = tmp_path / "rescored"  # the new shards are a dataset jobs.score reads, with both decoders
    for decoder in ("dali", "torch"):
        if decoder == "dali":
            pytest.importorskip("nvidia.dali")
        assert score(tiny_settings(str(new / "shard-*.tar"), out / decoder, decoder=decoder)) == 0
        rows = score_rows(out / decoder)
        assert sorted(rows) == want and all(r["status"] == "ok" for r in rows.values())
        before = score_rows(scored["scores"])
        assert all(rows[k]["topk_index"] == before[k]["topk_index"] for k in want)


def test_the_pax_shard_is_copied_under_new_headers(scored, tmp_path):
    """Samples with pax headers (long names) cannot be copied verbatim: their data is, under new headers."""
    new = tmp_path / "new"
    r = run_cli("jobs.select", f"output.dir={scored['scores']}", "where=shard = 'part-000003'", f"reshard.dir={new}")
    assert r.returncode == 0, r.stderr
    found = read_back(new)
    assert len(found) == 4 and all(k.startswith("deep/") for k in found)
    for key, parts in found.items():
        assert parts == {ext: scored["originals"][f"{key}.{ext}"] for ext in ("jpg", "cls", "json", "txt")}


def test_scores_as_a_component_and_beside_each_shard(scored, tmp_path):
    rows = score_rows(scored["scores"])
    for mode in ("json", "parquet"):
        new = tmp_path / mode
        r = run_cli("jobs.select", f"output.dir={scored['scores']}", "where=status = 'ok'", f"reshard.dir={new}",
                    f"reshard.scores={mode}", "reshard.shard_size=8")
        assert r.returncode == 0, r.stderr
        found = read_back(new)
        assert sorted(found) == sorted(k for k, row in rows.items() if row["status"] == "ok")
        if mode == "json":
            for key, parts in found.items():
                got = json.loads(parts.pop("scores.json"))
                assert got["topk_index"] == rows[key]["topk_index"] and got["txt"] == rows[key]["txt"]
        else:
            beside = {r["key"]: r for p in sorted(new.glob("shard-*.parquet")) for r in pq.read_table(p).to_pylist()}
            assert sorted(beside) == sorted(found) and all(beside[k]["topk_prob"] == rows[k]["topk_prob"] for k in found)
            first = pq.read_table(new / "shard-000000.parquet").column("key").to_pylist()
            assert first == list(read_back_order(new / "shard-000000.tar"))


def read_back_order(tar_path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return list(dict.fromkeys(split_key(m.name)[0] for m in tar))


def test_a_reshard_killed_twice_then_rerun_has_every_sample_once(scored, tmp_path):
    new = tmp_path / "new"
    args = [sys.executable, "-m", "jobs.select", f"output.dir={scored['scores']}", "where=status = 'ok'",
            f"reshard.dir={new}", "reshard.shard_size=2", "reshard.debug_delay_s=0.25", "reshard.workers=1"]
    for kill_after in (2, 6):  # index files written before the kill
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and len(list(new.glob("*.idx"))) < kill_after:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (new / "_SUCCESS").exists()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert re.search(r"(\d+) shard\(s\) written, (\d+) already there", r.stdout)
    written, kept = map(int, re.search(r"(\d+) shard\(s\) written, (\d+) already there", r.stdout).groups())
    assert kept >= 6 and written >= 1
    found = read_back(new)
    ok = sorted(k for k, row in score_rows(scored["scores"]).items() if row["status"] == "ok")
    assert sorted(found) == ok  # read_back fails on a key seen twice
    assert not [n for n in os.listdir(new) if ".tmp-" in n]
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "0 shard(s) written" in again.stdout


def test_incomplete_scores_are_refused_with_the_missing_shards(scored, tmp_path):
    scores = tmp_path / "scores"
    shutil.copytree(scored["scores"], scores)
    os.remove(scores / "part-000001.parquet")
    os.remove(scores / "_SUCCESS")
    r = run_cli("jobs.select", f"output.dir={scores}", "where=status = 'ok'", f"keep_list={tmp_path / 'k.parquet'}")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "incomplete" in lines[0] and "part-000001" in lines[0] and "no _SUCCESS" in lines[0]
    assert not (tmp_path / "k.parquet").exists()
    r = run_cli("jobs.select", f"output.dir={scores}", "where=status = 'ok'", f"keep_list={tmp_path / 'k.parquet'}",
                "allow_incomplete=true")
    assert r.returncode == 0, r.stderr
    shards = set(pq.read_table(tmp_path / "k.parquet").column("shard").to_pylist())
    assert shards == {"part-000000", "part-000002", "part-000003"}
    assert json.loads(pq.read_metadata(tmp_path / "k.parquet").metadata[b"shardscore"])["scores_complete"] is False


def test_scores_of_two_runs_are_refused(scored, tmp_path):
    scores = tmp_path / "scores"
    shutil.copytree(scored["scores"], scores)
    table = pq.read_table(scores / "part-000002.parquet")
    meta = json.loads(table.schema.metadata[b"shardscore"])
    pq.write_table(table.replace_schema_metadata({b"shardscore": json.dumps({**meta, "weights": "other"})}),
                   scores / "part-000002.parquet")
    r = run_cli("jobs.select", f"output.dir={scores}", "where=true", f"keep_list={tmp_path / 'k.parquet'}")
    assert r.returncode == 2 and "2 different runs" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_query_reads_only_the_columns_it_names(scored):
    from pipeline.select import SelectSettings, connect, open_scores, query

    settings = SelectSettings(output_dir=str(scored["scores"]), where="topk_prob[1] > 0.5", keep_list="k.parquet")
    con = connect(settings)
    plan = con.sql("EXPLAIN " + query(open_scores(settings), settings)).fetchall()[0][1]
    columns = pq.read_schema(scored["scores"] / "part-000000.parquet").names
    assert len(columns) > 6
    words = set(re.findall(r"[a-z_]+", plan.split("READ_PARQUET")[1]))
    assert {c for c in columns if c in words} == {"key", "shard", "topk_prob"}


NEVER = "keep_list=NEVER/k.parquet"


@pytest.mark.parametrize("args, message", [
    (["where=scroe > 1", NEVER], "where="),
    (["where=score >", NEVER], "where="),
    ([NEVER], "where is required"),
    (["where=true"], "nothing to write"),
    (["where=true", "keep_list=/tmp/k.csv"], "keep_list="),
    (["where=true", "reshard.dir=/tmp/x", "reshard.shard_size=0"], "reshard.shard_size"),
    (["where=true", "reshard.dir=/tmp/x", "reshard.scores=csv"], "reshard.scores"),
    (["where=true", NEVER, "bogus=1"], "bogus"),
])
def test_user_errors_are_one_line(scored, tmp_path, args, message):
    args = [a.replace("NEVER", str(tmp_path)).replace("/tmp/", f"{tmp_path}/") for a in args]
    r = run_cli("jobs.select", f"output.dir={scored['scores']}", *args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not os.listdir(tmp_path)  # nothing written


def test_a_missing_scores_folder_is_one_line(tmp_path):
    r = run_cli("jobs.select", f"output.dir={tmp_path / 'nothing'}", "where=true", "keep_list=k.parquet")
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("predicate", ["caption ILIKE '%dog%'", 'meta."Width" > 5', "key = 'a\\b'", "key LIKE 'x\\'",
                                       "'a' = shard OR shard = 'b'", "caption = '${not hydra}'", "score > 5 -- a note"])
def test_a_predicate_reaches_duckdb_as_typed(predicate):
    """The shell hands the predicate over as typed; Hydra's grammar must not change it on the way."""
    from hydra import compose, initialize_config_dir

    from jobs._entry import CONF_DIR, quote_verbatim, to_plain

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("select", overrides=["output.dir=/x", quote_verbatim(f"where={predicate}", ("where",))])
    assert to_plain(cfg)["where"] == predicate


def test_another_selection_is_refused_then_replaced_with_overwrite(scored, tmp_path):
    new = tmp_path / "new"
    base = ["jobs.select", f"output.dir={scored['scores']}", f"reshard.dir={new}", "reshard.shard_size=3"]
    assert run_cli(*base, "where=shard = 'part-000000'").returncode == 0
    r = run_cli(*base, "where=shard = 'part-000001'", "reshard.prefix=other")
    assert r.returncode == 2 and "another selection" in r.stderr and "where was" in r.stderr
    r = run_cli(*base, "where=shard = 'part-000001'", "reshard.prefix=other", "reshard.overwrite=true")
    assert r.returncode == 0, r.stderr
    assert not list(new.glob("shard-*")) and sorted(read_back(new)) == [f"{i:06d}" for i in range(10, 20)]


def test_a_source_shard_changed_after_indexing_stops_the_reshard(scored, tmp_path):
    """Bytes where the index says a header is, but no such header (checked at the first and the last
    sample taken from a shard): one line, no shard written from them."""
    shards = tmp_path / "shards"
    shutil.copytree(scored["root"] / "shards", shards)
    tar = shards / "part-000001.tar"
    data = bytearray(tar.read_bytes())
    data[0:100] = b"x" * 100  # the first member's header garbled; same size
    tar.write_bytes(bytes(data))
    os.utime(shards / "part-000001.idx")  # the index still counts as fresh
    r = run_cli("jobs.select", f"output.dir={scored['scores']}", "where=shard = 'part-000001'",
                f"reshard.dir={tmp_path / 'new'}", f"data.shards={shards}/part-*.tar")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "changed since it was indexed" in lines[0], r.stderr
    assert not list((tmp_path / "new").glob("*.idx"))


def test_scores_in_another_order_than_the_tar_are_found_by_key(scored, tmp_path):
    """A shard's samples are taken at their rows in its scores when the index agrees there; scores
    written in another order (here reversed) are found by key, and come out in the scores' order."""
    scores = tmp_path / "scores"
    shutil.copytree(scored["scores"], scores)
    table = pq.read_table(scores / "part-000001.parquet")
    reversed_rows = table.take(list(range(table.num_rows - 1, -1, -1)))
    pq.write_table(reversed_rows.replace_schema_metadata(table.schema.metadata), scores / "part-000001.parquet")
    new = tmp_path / "new"
    r = run_cli("jobs.select", f"output.dir={scores}", "where=shard = 'part-000001'", f"reshard.dir={new}",
                "reshard.shard_size=100")
    assert r.returncode == 0, r.stderr
    keys = reversed_rows.column("key").to_pylist()
    assert read_back_order(new / "shard-000000.tar") == keys and keys == sorted(keys, reverse=True)
    for key, parts in read_back(new).items():
        assert parts == {split_key(n)[1]: v for n, v in scored["originals"].items() if split_key(n)[0] == key}
