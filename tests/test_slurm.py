"""On a real one-node Slurm cluster (slurm/cluster.sh): array jobs, the Hydra launcher, preemption.

The module starts its own cluster (own state folder and ports, so a developer's cluster is left alone)
and stops it at the end. It is skipped, for one stated reason, only where that cluster cannot start.
SHARDSCORE_REQUIRE_SLURM=1 (CI) turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, TINY, small_jpegs
from pipeline.pack import write_shards
from pipeline.shard_index import read_index

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]  # one cluster, in one worker
NEEDS_ROOT = "the Slurm test cluster needs root (slurm/cluster.sh starts munged, slurmctld and slurmd)"
if os.geteuid() != 0 and os.environ.get("SHARDSCORE_REQUIRE_SLURM") != "1":
    pytest.skip(NEEDS_ROOT, allow_module_level=True)

CLUSTER_SH = os.path.join(ROOT, "slurm", "cluster.sh")
SBATCH = os.path.join(ROOT, "slurm", "score.sbatch")
# The cluster's GPUs are stand-ins (CUDA_VISIBLE_DEVICES is set, CUDA is not there): device=cpu on purpose.
FAST = [*TINY, "decoder=torch", "device=cpu"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


class Cluster:
    def __init__(self, env: dict):
        self.env = env

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def sbatch(self, logs, *args: str) -> str:
        """Submit slurm/score.sbatch with sbatch options and Hydra overrides; returns the job id."""
        logs.mkdir(parents=True, exist_ok=True)  # Slurm fails a job whose log folder is missing
        opts = ["--parsable", f"--chdir={ROOT}", "--cpus-per-task=1", "--time=10",
                f"--output={logs}/%x-%A_%a.out", f"--error={logs}/%x-%A_%a.err"]
        sbatch_opts = [a for a in args if a.startswith("-")]
        overrides = [a for a in args if not a.startswith("-")]
        return self.run("sbatch", *opts, *sbatch_opts, SBATCH, *overrides).stdout.strip().split(";")[0]

    def tasks(self, job: str, patience: float = 20) -> dict[str, dict[str, str]]:
        """Slurm's record of each task of an array job (no accounting needed): {array index: fields}; {} when
        slurmctld did not answer for `patience` seconds (a busy slurmctld times out a request: CI saw it)."""
        deadline = time.monotonic() + patience
        while (r := self.run("scontrol", "-o", "show", "job", job, check=False)).returncode != 0:
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.5)
        records = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in r.stdout.splitlines()]
        return {r.get("ArrayTaskId", "-"): r for r in records}

    def wait(self, job: str, timeout: float, logs=None) -> dict[str, dict[str, str]]:
        """The tasks' records once every task has ended. Decided from the records themselves: an empty
        squeue can also mean a slurmctld too busy to answer, or a task between its requeue and its restart."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tasks = self.tasks(job)
            if tasks and all(t.get("JobState") in ENDED for t in tasks.values()):
                return tasks
            time.sleep(0.5)
        self.run("scancel", job, check=False)
        pytest.fail(f"job {job} still queued or running after {timeout:.0f} s\n{read_logs(logs)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("slurm-state"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_TEST_CTLD_PORT=str(free_port()), SLURM_TEST_SLURMD_PORT=str(free_port()),
               PYTHONUNBUFFERED="1", SHARDSCORE_PYTHON=sys.executable)
    reason = None
    if os.geteuid() != 0:
        reason = NEEDS_ROOT
    else:
        r = subprocess.run(["bash", CLUSTER_SH, "start", state], env=env, capture_output=True, text=True,
                           timeout=900)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            reason = f"the Slurm test cluster cannot start (bash slurm/cluster.sh start): {last}"
    if reason:
        if os.environ.get("SHARDSCORE_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    env["SLURM_CONF"] = os.path.join(state, "slurm.conf")
    try:
        yield Cluster(env)
    finally:
        subprocess.run(["bash", CLUSTER_SH, "stop", state], env=env, capture_output=True, timeout=120)


def make_shards(folder, sizes: list[int], seed: int) -> list[str]:
    """One shard per size, named in order (`s00-000000.tar`, `s01-…`), so round-robin ranks are known."""
    paths, start = [], 0
    for i, n in enumerate(sizes):
        paths += write_shards(small_jpegs(n, seed, start), str(folder), shard_size=n, prefix=f"s{i:02d}")
        start += n
    return paths


def shards_arg(paths: list[str]) -> str:
    return f"data.shards=[{','.join(paths)}]"


def read_logs(logs) -> str:
    if logs is None:
        return ""
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*")) if p.is_file())


def verify(paths: list[str], out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.verify", shards_arg(paths), f"output.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def assert_exactly_once(paths: list[str], out) -> None:
    want = {(os.path.basename(p)[:-4], key) for p in paths for key in read_index(p[:-4] + ".idx").keys}
    rows = [(r["shard"], r["key"]) for p in paths
            for r in pq.read_table(out / f"{os.path.basename(p)[:-4]}.parquet", columns=["shard", "key"]).to_pylist()]
    assert len(rows) == len(set(rows)) and set(rows) == want
    r = verify(paths, out)
    assert r.returncode == 0 and r.stdout.strip().endswith("complete"), r.stdout + r.stderr


def metrics(out, rank: int) -> dict:
    return json.loads((out / "_metrics" / f"rank-{rank:05d}.json").read_text())


def test_array_job_splits_shards_over_tasks(cluster, tmp_path):
    paths = make_shards(tmp_path / "shards", [6, 6, 6, 5], seed=11)
    out, logs = tmp_path / "out", tmp_path / "logs"
    job = cluster.sbatch(logs, "--array=0-1", *FAST, shards_arg(paths), f"output.dir={out}")
    tasks = cluster.wait(job, timeout=180, logs=logs)

    assert sorted(tasks) == ["0", "1"], tasks
    for t in tasks.values():
        assert (t["JobState"], t["ExitCode"], t["Restarts"]) == ("COMPLETED", "0:0", "0"), read_logs(logs)
    assert_exactly_once(paths, out)
    for rank in (0, 1):  # round-robin: rank 0 has shards 0 and 2, rank 1 has 1 and 3, each scored once
        m = metrics(out, rank)
        assert (m["rank"], m["world_size"], m["shards_written"], m["exit_code"]) == (rank, 2, 2, 0)
        assert m["images"] == sum(pq.read_metadata(out / f"s{i:02d}-000000.parquet").num_rows
                                  for i in (rank, rank + 2))
    assert sorted(p.name for p in (out / "_metrics").iterdir()) == ["done-00000.json", "done-00001.json",
                                                               "rank-00000.json", "rank-00001.json"]
    assert (out / "_SUCCESS").exists()
    assert re.search(r"ranks +0 running, 2 finished, 0 silent of 2; 23 of 23 images", verify(paths, out).stdout)


def test_array_step_still_gives_consecutive_ranks(cluster, tmp_path):
    """`--array=0-2:2` runs tasks 0 and 2: they must be ranks 0 and 1 of 2, not 0 and 2."""
    paths = make_shards(tmp_path / "shards", [3, 3], seed=12)
    out, logs = tmp_path / "out", tmp_path / "logs"
    job = cluster.sbatch(logs, "--array=0-2:2", *FAST, shards_arg(paths), f"output.dir={out}")
    tasks = cluster.wait(job, timeout=180, logs=logs)
    assert sorted(tasks) == ["0", "2"] and all(t["ExitCode"] == "0:0" for t in tasks.values()), read_logs(logs)
    assert [metrics(out, r)["world_size"] for r in (0, 1)] == [2, 2]
    assert_exactly_once(paths, out)


def test_hydra_launcher_runs_a_sweep(cluster, tmp_path):
    paths = make_shards(tmp_path / "shards", [6, 6, 6, 5], seed=13)
    r = subprocess.run(
        [sys.executable, "-m", "jobs.score", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", *FAST, shards_arg(paths),
         f"output.dir={tmp_path}/bs${{batch_size}}", f"hydra.sweep.dir={tmp_path}/sweep", "batch_size=4,8"],
        cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(list((tmp_path / "sweep").glob(".submitit/*/*_submission.sh"))) == 1  # one array of two runs
    for batch_size in (4, 8):
        out = tmp_path / f"bs{batch_size}"
        assert_exactly_once(paths, out)
        m = metrics(out, 0)  # each run of the sweep is the only rank of its output, not one of an array
        assert (m["batch_size"], m["rank"], m["world_size"], m["images"]) == (batch_size, 0, 1, 23)


def test_preempted_task_requeues_itself_and_resumes(cluster, tmp_path):
    # Each rank's first shard is small, so a shard is complete early and the rest still takes a while.
    paths = make_shards(tmp_path / "shards", [3, 3, 16, 16, 16, 16], seed=14)
    out, logs = tmp_path / "out", tmp_path / "logs"
    job = cluster.sbatch(logs, "--array=0-1", *FAST, "batch_size=1", "loader.threads=1", shards_arg(paths),
                         f"output.dir={out}")
    # Signal the task that shares its job id with the array: requeueing that bare id would requeue both.
    deadline = time.monotonic() + 120
    while not (target := next((i for i, t in cluster.tasks(job).items()
                               if t.get("JobId") == t.get("ArrayJobId") and i.isdigit()), None)):
        assert time.monotonic() < deadline, cluster.tasks(job)
        time.sleep(0.2)
    rank = int(target)
    while not (out / f"s{rank:02d}-000000.parquet").exists():
        assert time.monotonic() < deadline, read_logs(logs)
        time.sleep(0.05)
    cluster.run("scancel", "--batch", "--signal=USR1", f"{job}_{target}")
    tasks = cluster.wait(job, timeout=240, logs=logs)

    other = str(1 - rank)  # only the signalled task was requeued, and both ended well
    assert (tasks[target]["Restarts"], tasks[target]["ExitCode"]) == ("1", "0:0"), (tasks, read_logs(logs))
    assert (tasks[other]["Restarts"], tasks[other]["ExitCode"]) == ("0", "0:0"), (tasks, read_logs(logs))
    log = (logs / f"shardscore-{job}_{target}.out").read_text()
    assert "stopped by SIGUSR1" in log and "step exit code 75" in log, log
    assert f"requeueing task={job}_{target}" in log and "restarts=1" in log, log
    assert re.search(r"resume: [1-2] shard\(s\) already complete", log), log
    assert_exactly_once(paths, out)
    m = metrics(out, rank)  # the resumed run's record: it skipped what the stopped run had written
    assert m["exit_code"] == 0 and m["stopped_by"] is None and m["shards_skipped_complete"] >= 1


def test_hydra_launcher_requeues_a_preempted_run(cluster, tmp_path):
    paths = make_shards(tmp_path / "shards", [3, 16, 16], seed=15)
    out, sweep = tmp_path / "out", tmp_path / "sweep"
    cmd = [sys.executable, "-m", "jobs.score", "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=10", *FAST, "batch_size=1", "loader.threads=1", shards_arg(paths),
           f"output.dir={out}", f"hydra.sweep.dir={sweep}"]
    with subprocess.Popen(cmd, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as sweep_run:
        try:
            deadline = time.monotonic() + 120
            while not (out / "s00-000000.parquet").exists():
                assert time.monotonic() < deadline and sweep_run.poll() is None, "the run never wrote a shard"
                time.sleep(0.05)
            job = cluster.run("squeue", "-h", "-o", "%i").stdout.split()[0]
            cluster.run("scancel", "--signal=USR1", job)  # what Slurm sends signal_delay_s before the limit
            output, _ = sweep_run.communicate(timeout=240)
        finally:
            sweep_run.kill()
    assert sweep_run.returncode == 0, output[-3000:]
    assert [t["Restarts"] for t in cluster.tasks(job).values()] == ["1"]
    log = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))
    assert "stopped by SIGUSR1" in log and "requeueing this run through the launcher" in log, log
    assert "resume: 1 shard(s) already complete" in log, log
    assert_exactly_once(paths, out)
    m = metrics(out, 0)
    assert m["exit_code"] == 0 and m["stopped_by"] is None and m["shards_skipped_complete"] == 1
