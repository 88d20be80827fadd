"""Where NVIDIA DALI cannot be imported (no DALI extra, an ARM node, a driver the wheel does not fit), the job
still indexes and scores with the torch decoder. `tests/without_dali/sitecustomize.py` blocks the imports."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq

from conftest import ROOT, TINY, run_cli

BLOCK = {"PYTHONPATH": os.path.join(ROOT, "tests", "without_dali")}


def test_the_job_runs_with_the_torch_decoder_and_says_so(tmp_path):
    from pipeline.pack import write_shards
    from conftest import small_jpegs

    paths = write_shards(small_jpegs(12, seed=4), str(tmp_path / "in"), 5, "nd", index=False)
    assert not any(os.path.exists(p[:-4] + ".idx") for p in paths)  # the job indexes them itself, without DALI
    out = tmp_path / "out"
    r = run_cli("jobs.score", *TINY, f"data.shards={tmp_path / 'in'}/nd-*.tar", f"output.dir={out}", env=BLOCK)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nvidia-dali does not import; using decoder=torch" in r.stdout + r.stderr
    metrics = json.loads((out / "_metrics" / "rank-00000.json").read_text())
    assert metrics["decoder"] == "torch" and metrics["images"] == 12
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}


def test_decoder_dali_without_dali_is_a_user_error(shards, tmp_path):
    r = run_cli("jobs.score", *TINY, f"data.shards={shards[0]}", f"output.dir={tmp_path}", "decoder=dali", env=BLOCK)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: decoder=dali but nvidia-dali is not installed; use "
                                             "decoder=torch or decoder=auto"]
