"""jobs.verify: footers and keys against each shard's index, the same answer over one process, several
processes and several ranks (each leaving a record the last one merges)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli, small_jpegs, tiny_settings
from pipeline.layout import OutputLayout
from pipeline.pack import write_shards
from pipeline.runner import score
from pipeline.shard_index import create_index, index_keys, read_index
from pipeline.shards import expand_shards
from pipeline.verify import verify


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """Twenty shards of two samples each, scored."""
    root = tmp_path_factory.mktemp("verify")
    paths = write_shards(small_jpegs(40, seed=21), str(root / "shards"), 2, "part")
    assert score(tiny_settings(str(root / "shards" / "part-*.tar"), root / "out")) == 0
    return {"root": root, "paths": paths, "pattern": str(root / "shards" / "part-*.tar")}


def damaged(output, folder):
    """A copy of the output with one shard file gone, one holding a key twice and one of another run."""
    shutil.copytree(output["root"] / "out", folder)
    os.remove(folder / "part-000003.parquet")
    os.remove(folder / "_SUCCESS")
    path = folder / "part-000011.parquet"
    table = pq.read_table(path)
    doubled = pa.concat_tables([table.slice(0, 1), table.slice(0, 1)])
    pq.write_table(doubled.replace_schema_metadata(table.schema.metadata), path)
    path = folder / "part-000017.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"shardscore"])
    pq.write_table(table.replace_schema_metadata({b"shardscore": json.dumps({**meta, "precision": "bf16"})}), path)
    return folder


def problems(table: str) -> list[str]:
    return [ln for ln in table.splitlines() if ln.startswith(("shards", "rows", "status", "  ")) and "running" not in ln]


def test_one_process_several_and_several_ranks_agree(output, tmp_path):
    folder = damaged(output, tmp_path / "out")
    paths = expand_shards(output["pattern"])
    complete, alone, content = verify(paths, OutputLayout(str(folder)))
    assert complete is False and content["remaining"] == ["part-000003", "part-000011", "part-000017"]
    lines = problems(alone)
    assert "  missing           part-000003: no output" in lines
    assert any(ln.startswith("  incomplete        part-000011: 2 rows for 2 samples") for ln in lines)
    assert any(ln.startswith("  duplicate keys    part-000011") for ln in lines)
    assert any(ln.startswith("  missing keys      part-000011") for ln in lines)
    assert any(ln.startswith("  incomplete        part-000017: written by another run: precision") for ln in lines)
    assert problems(verify(paths, OutputLayout(str(folder)), workers=2)[1]) == lines
    layout = OutputLayout(str(folder))
    first = verify(paths, layout, rank=0, world=3, verification="t")
    second = verify(paths, layout, rank=2, world=3, verification="t")
    assert first[2] == {} and second[2] == {} and "still to report" in first[1] and "ranks 1 still" in second[1]
    merged = verify(paths, layout, rank=1, world=3, verification="t")
    assert merged[0] is False and problems(merged[1]) == lines
    assert sorted(os.listdir(folder / "_metrics")) == sorted(
        [n for n in os.listdir(output["root"] / "out" / "_metrics")] + [f"verify-{r:05d}.json" for r in range(3)])


def test_ranks_of_a_cli_verification_merge_and_mark_success(output, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(output["root"] / "out", folder)
    os.remove(folder / "_SUCCESS")
    args = [f"data.shards={output['pattern']}", f"output.dir={folder}", "dist.world_size=2", "verify.id=night-1"]
    r0 = run_cli("jobs.verify", *args, "dist.rank=0")
    assert r0.returncode == 0 and "rank 0 of 2: 10 shards, 0 not done; ranks 1 still to report" in r0.stdout, r0.stderr
    assert not (folder / "_SUCCESS").exists()
    r1 = run_cli("jobs.verify", *args, "dist.rank=1")
    assert r1.returncode == 0 and "shards   20: done 20" in r1.stdout and r1.stdout.strip().endswith("complete")
    assert (folder / "_SUCCESS").exists()
    bad = run_cli("jobs.verify", f"data.shards={output['pattern']}", f"output.dir={folder}", "verify.workers=0")
    assert bad.returncode == 2 and "verify.workers" in bad.stderr


def test_a_truncated_shard_is_unreadable_input(output, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(output["root"] / "shards", shards)
    tar = shards / "part-000005.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    os.utime(shards / "part-000005.idx")  # the index stays fresh: the tar's end is what gives it away
    complete, table, content = verify(expand_shards(str(shards / "part-*.tar")), OutputLayout(str(output["root"] / "out")))
    assert not complete and "part-000005" in content["failed"] and "truncated" in content["failed"]["part-000005"]


def test_index_keys_match_the_index_reader(tmp_path):
    """The Arrow-split keys equal `read_index`'s for folders, dotted folders, several dots and no extension."""
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name in ["a/b.c/x.jpg", "a/b.c/x.json", "y.jpg", "z.d.e", "z.d.f", "noext", "w.tar.gz"]:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    create_index(str(path), str(tmp_path / "odd.idx"))
    keys, end = index_keys(str(tmp_path / "odd.idx"))
    index = read_index(str(tmp_path / "odd.idx"))
    assert keys.to_pylist() == index.keys == ["a/b.c/x", "y", "z", "noex", "w"] and end == index.end
    plain = write_shards(small_jpegs(5, seed=2), str(tmp_path / "plain"), 5, "p")[0]
    keys, end = index_keys(plain[:-4] + ".idx")
    assert keys.to_pylist() == read_index(plain[:-4] + ".idx").keys and end == read_index(plain[:-4] + ".idx").end
