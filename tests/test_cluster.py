"""Where a process runs: rank and world from dist.*, torchrun or Slurm; its GPU; its CPUs; and a GPU that
was given but cannot be used ends the run at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, run_cli, small_jpegs
from pipeline import cluster
from pipeline.errors import UserError
from pipeline.pack import write_shards
from pipeline.settings import DistSettings


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", *cluster.GPU_VARIABLES):
            monkeypatch.delenv(key)
    return monkeypatch


def test_rank_from_slurm_array_and_tasks(clean_env):
    assert cluster.rank_and_world(DistSettings()) == (0, 1)
    for key, value in {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4",
                       "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}.items():
        clean_env.setenv(key, value)
    assert cluster.rank_and_world(DistSettings()) == (7, 8)
    assert cluster.rank_and_world(DistSettings(rank=2, world_size=5)) == (2, 5)
    with pytest.raises(UserError):
        cluster.rank_and_world(DistSettings(rank=5, world_size=5))


def test_torchrun_comes_before_slurm_and_dist_before_both(clean_env):
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_LOCALID", "3")
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    assert cluster.rank_and_world(DistSettings()) == (5, 8)
    assert cluster.local_rank() == 1
    assert cluster.rank_and_world(DistSettings(rank=0, world_size=2)) == (0, 2)
    clean_env.delenv("LOCAL_RANK")
    assert cluster.local_rank() == 3


def test_cpus_come_from_slurm_then_the_affinity_mask(clean_env):
    assert cluster.cpus_available() == len(os.sched_getaffinity(0))
    clean_env.setenv("SLURM_CPUS_PER_TASK", "6")
    assert cluster.cpus_available() == 6


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    return write_shards(small_jpegs(12, seed=17), str(tmp_path_factory.mktemp("four")), 3, "q")


def score_ranks(shards, out, envs) -> dict[int, list[str]]:
    """Run one jobs.score process per environment, side by side; {rank: the shards it wrote}."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    pattern = os.path.join(os.path.dirname(shards[0]), "q-*.tar")
    procs = [subprocess.Popen([sys.executable, "-m", "jobs.score", *TINY, f"data.shards={pattern}", f"output.dir={out}",
                               "device=cpu", "loader.threads=1"], cwd=ROOT, env={**base, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for env in envs]
    for p in procs:
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-2000:]
    records = [json.loads(path.read_text()) for path in sorted((out / "_metrics").glob("done-*.json"))]
    return {r["rank"]: r["shards_done"] for r in records}


def test_torchrun_environment_splits_shards_like_slurm(four_shards, tmp_path):
    torchrun = score_ranks(four_shards, tmp_path / "torchrun",
                           [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)} for r in (0, 1)])
    slurm = score_ranks(four_shards, tmp_path / "slurm",
                        [{"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r)} for r in (0, 1)])
    assert torchrun == slurm
    assert torchrun[0] == ["q-000000", "q-000002"] and torchrun[1] == ["q-000001", "q-000003"]
    assert (tmp_path / "torchrun" / "_SUCCESS").exists()


def test_a_gpu_given_but_unusable_stops_the_run(four_shards, tmp_path):
    """No GPU here: CUDA_VISIBLE_DEVICES=0 stands for a node whose driver cannot run this CUDA build."""
    r = run_cli("jobs.score", *TINY, f"data.shards={four_shards[0]}", f"output.dir={tmp_path / 'auto'}",
                "device=auto", env={"CUDA_VISIBLE_DEVICES": "0"})
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "CUDA cannot be used although CUDA_VISIBLE_DEVICES=0" in lines[0] and "device=cpu" in lines[0]
    assert not list((tmp_path / "auto").glob("*.parquet"))
    on_purpose = run_cli("jobs.score", *TINY, f"data.shards={four_shards[0]}", f"output.dir={tmp_path / 'cpu'}",
                         "device=cpu", env={"CUDA_VISIBLE_DEVICES": "0"})
    assert on_purpose.returncode == 0, on_purpose.stderr[-2000:]
