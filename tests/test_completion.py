"""One completeness rule (rows + the run's identity) for resume, the completion records and verify; a
rank's end-of-run work touches only its own shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq

from conftest import verify_output
from pipeline.runner import score
from pipeline.settings import DataSettings, DistSettings, ModelSettings, OutputSettings, ScoreSettings


def settings(shards, out, rank, world=2, model="resnet18", topk=5, outputs=("topk",)) -> ScoreSettings:
    return ScoreSettings(
        data=DataSettings(shards=shards), output=OutputSettings(dir=str(out)),
        model=ModelSettings(name=model, weights=None, resize_size=40, crop_size=32, topk=topk),
        outputs=outputs, batch_size=4, precision="fp32", decoder="torch", progress=False,
        dist=DistSettings(rank, world))


def copy_shards(shards, folder):
    folder.mkdir()
    for p in shards:
        shutil.copy(p, folder)
    return str(folder / "part-*.tar")


def test_success_waits_for_every_rank_and_each_rank_touches_only_its_shards(shards, tmp_path):
    pattern, out = copy_shards(shards, tmp_path / "in"), tmp_path / "out"
    assert score(settings(pattern, out, rank=0)) == 0
    # Rank 0 scored shards 0 and 2; it never indexed, opened or wrote rank 1's shard.
    assert not (tmp_path / "in" / "part-000001.idx").exists()
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-000000.parquet", "part-000002.parquet"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert not manifest["complete"] and manifest["ranks_missing"] == [1] and not (out / "_SUCCESS").exists()

    assert score(settings(pattern, out, rank=1)) == 0  # the last rank to finish sees all records complete
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["complete"] and success["shards"] == 3 and success["rows"] == 23
    assert success["ranks_complete"] == 2 and success["model"] == "resnet18"


def test_no_success_over_output_that_mixes_two_models(shards, tmp_path):
    """Rank 0 reruns with another model while rank 1's files of the first model remain: the output is
    not complete by the one rule, so no `_SUCCESS`, and verify says which files belong to another run."""
    pattern, out = copy_shards(shards, tmp_path / "in"), tmp_path / "out"
    for rank in (0, 1):
        assert score(settings(pattern, out, rank)) == 0
    assert (out / "_SUCCESS").exists()

    assert score(settings(pattern, out, rank=0, model="mobilenet_v3_small")) == 0
    assert not (out / "_SUCCESS").exists()  # removed when rank 0 began to change the output
    manifest = json.loads((out / "_manifest.json").read_text())
    assert not manifest["complete"] and manifest["ranks_complete"] == 1
    models = {p.name: json.loads(pq.read_schema(p).metadata[b"shardscore"])["model"] for p in out.glob("*.parquet")}
    assert models == {"part-000000.parquet": "mobilenet_v3_small", "part-000001.parquet": "resnet18",
                      "part-000002.parquet": "mobilenet_v3_small"}

    complete, table = verify_output(pattern, out)
    assert not complete, table
    assert "part-000001: written by another run: model was 'resnet18', now 'mobilenet_v3_small'" in table
    assert "NOT complete" in table and not (out / "_SUCCESS").exists()

    assert score(settings(pattern, out, rank=1, model="mobilenet_v3_small")) == 0  # rank 1 redoes its shard
    assert json.loads((out / "_SUCCESS").read_text())["model"] == "mobilenet_v3_small"
    assert verify_output(pattern, out)[0]


def test_resume_redoes_a_shard_written_under_another_identity(shards, tmp_path):
    pattern, out = copy_shards(shards, tmp_path / "in"), tmp_path / "out"
    assert score(settings(pattern, out, rank=0, world=1)) == 0
    before = {p.name: os.path.getmtime(p) for p in out.glob("*.parquet")}
    assert score(settings(pattern, out, rank=0, world=1)) == 0  # same identity: nothing redone
    assert {p.name: os.path.getmtime(p) for p in out.glob("*.parquet")} == before
    assert score(settings(pattern, out, rank=0, world=1, topk=3)) == 0  # another output: every shard redone
    assert all(os.path.getmtime(out / name) > mtime for name, mtime in before.items())
    assert len(pq.read_table(out / "part-000000.parquet").column("topk_index")[0]) == 3
    before = {p.name: os.path.getmtime(p) for p in out.glob("*.parquet")}
    assert score(settings(pattern, out, rank=0, world=1, topk=3, outputs=("topk", "embedding"))) == 0
    assert all(os.path.getmtime(out / name) > mtime for name, mtime in before.items())
    assert "embedding" in pq.read_schema(out / "part-000000.parquet").names


def test_a_job_builds_arrow_tables_without_importing_pandas():
    """pyarrow would import pandas (~0.5 s a process) for its first array; a job skips that, and a later
    conversion to pandas still works."""
    code = (
        "import sys, pyarrow as pa\n"
        "from pipeline.layout import arrow_without_pandas\n"
        "arrow_without_pandas()\n"
        "table = pa.table({'key': pa.array(['a', 'b'], pa.string())})\n"
        "assert 'pandas' not in sys.modules, 'pandas imported'\n"
        "assert table.to_pandas()['key'].tolist() == ['a', 'b']\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
