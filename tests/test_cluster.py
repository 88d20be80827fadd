"""Where a process runs: rank and world from dist.*, torchrun or Slurm; its GPU; its CPUs; and a GPU that
was given but cannot be used ends the run at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, run_cli, small_jpegs, tiny_settings
from pipeline.runner import score
from pipeline import cluster
from pipeline.errors import UserError
from pipeline.pack import write_shards
from pipeline.settings import DistSettings


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                *cluster.GPU_VARIABLES):
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
    assert cluster.cpus_available() == len(os.sched_getaffinity(0))  # one process on this node
    clean_env.setenv("SLURM_CPUS_PER_TASK", "6")
    assert cluster.cpus_available() == 6


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    return write_shards(small_jpegs(12, seed=17), str(tmp_path_factory.mktemp("four")), 3, "q")


def test_torchrun_two_ranks_side_by_side(four_shards, tmp_path):
    """The real torchrun, two processes on this 2-core machine: disjoint shards, scored at the same time,
    one CPU and one decoder thread each, a log folder each, `_SUCCESS` written once."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    pattern = os.path.join(os.path.dirname(four_shards[0]), "q-*.tar")
    out = tmp_path / "out"
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc-per-node=2",
                        "-m", "jobs.score", *TINY, f"data.shards={pattern}", f"output.dir={out}", "device=cpu",
                        "decoder=dali"], cwd=ROOT, env=base, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    records = {json.loads(p.read_text())["rank"]: json.loads(p.read_text()) for p in (out / "_metrics").glob("done-*")}
    assert records[0]["shards_done"] == ["q-000000", "q-000002"] and records[1]["shards_done"] == ["q-000001", "q-000003"]
    metrics = [json.loads((out / "_metrics" / f"rank-{rank:05d}.json").read_text()) for rank in (0, 1)]
    assert [m["loader_threads"] for m in metrics] == [1, 1]
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(metrics[0]["cpus"]) & set(metrics[1]["cpus"])  # each rank on its own CPU
    spans = sorted((m["finished_at"] - m["job_seconds"], m["finished_at"]) for m in metrics)  # planning to the end
    assert spans[1][0] < spans[0][1]  # the two ran at the same time
    logs = sorted(p.name.rsplit("-", 1)[-1] for p in (out / "_logs").iterdir())
    assert logs == ["rank0", "rank1"]
    wrote = [p for p in (out / "_logs").rglob("*.log") if "_SUCCESS" in p.read_text()]
    assert len(wrote) == 1 and (out / "_SUCCESS").exists()


def test_the_cpu_share_of_local_ranks(clean_env):
    mask = sorted(os.sched_getaffinity(0))
    clean_env.setenv("LOCAL_WORLD_SIZE", str(len(mask)))
    shares = []
    for local in range(len(mask)):
        clean_env.setenv("LOCAL_RANK", str(local))
        shares.append(cluster.cpu_share())
    assert shares == [[cpu] for cpu in mask]  # one CPU each, none shared
    clean_env.setenv("LOCAL_WORLD_SIZE", str(4 * len(mask)))
    assert len(cluster.cpu_share()) == 1
    clean_env.delenv("LOCAL_WORLD_SIZE")
    clean_env.setenv("SLURM_CPUS_PER_TASK", "6")
    assert cluster.cpus_available() == 6  # Slurm's own count wins
    assert cluster._expand_slurm_counts("2(x3),1") == [2, 2, 2, 1]
    clean_env.setenv("SLURM_TASKS_PER_NODE", "2(x3),1")
    clean_env.setenv("SLURM_NODEID", "3")
    assert cluster.local_processes() == 1


def test_a_rank_takes_its_share_of_the_cpus_once(clean_env, monkeypatch):
    """After use_cpu_share narrowed the mask, the thread count is the share, not the share's share."""
    mask = {"now": list(range(8))}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(mask["now"]))
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: mask.update(now=sorted(cpus)))
    monkeypatch.setattr(cluster, "_applied_share", None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.delenv("DALI_AFFINITY_MASK", raising=False)  # (use_cpu_share sets it; undone after the test)
    clean_env.setenv("LOCAL_WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "1")
    assert cluster.use_cpu_share() == [2, 3] and mask["now"] == [2, 3]
    assert cluster.cpus_available() == 2 and cluster.use_cpu_share() == [2, 3]  # a second plan() changes nothing


def test_a_gpu_given_but_unusable_stops_the_run(four_shards, tmp_path, monkeypatch):
    """No GPU here: CUDA_VISIBLE_DEVICES=0 stands for a node whose driver cannot run this CUDA build."""
    r = run_cli("jobs.score", *TINY, f"data.shards={four_shards[0]}", f"output.dir={tmp_path / 'auto'}",
                "device=auto", env={"CUDA_VISIBLE_DEVICES": "0"})
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "CUDA cannot be used although CUDA_VISIBLE_DEVICES=0" in lines[0] and "device=cpu" in lines[0]
    assert not list((tmp_path / "auto").glob("*.parquet"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert score(tiny_settings(four_shards[0], tmp_path / "cpu", device="cpu")) == 0  # on the CPU on purpose
