"""python -m jobs.score data.shards=… output.dir=… [key=value …]: score shards into Parquet."""

from __future__ import annotations

import json
import os

from jobs._entry import launched_by_slurm_launcher, requeue_with_launcher, run_job, to_plain
from pipeline.errors import EXIT_REQUEUE
from pipeline.runner import score
from pipeline.settings import ScoreSettings, from_mapping
from pipeline.shards import rank_from_env


def main(cfg) -> int:
    config = to_plain(cfg, drop=("paths", "hydra", "bench", "mode"))
    launched = launched_by_slurm_launcher()
    if launched and config["dist"].get("rank") is None and config["dist"].get("world_size") is None:
        # The launcher submits a sweep as one Slurm array whose tasks are separate runs, not ranks of one.
        env = os.environ
        config["dist"] = {"rank": int(env.get("SLURM_PROCID", 0)), "world_size": int(env.get("SLURM_NTASKS", 1))}
    settings = from_mapping(ScoreSettings, config)
    code = score(settings, resolved_config=config)
    if code == EXIT_REQUEUE and launched and _stopped_by(settings) == "SIGUSR1":
        requeue_with_launcher()  # exits; a stop by SIGTERM (scancel) is not requeued
    return code


def _stopped_by(settings: ScoreSettings) -> str | None:
    """The signal that stopped this rank's run, from the metrics file the run has just written."""
    rank, _ = rank_from_env(settings.dist)
    with open(os.path.join(settings.output.dir, "metrics", f"rank-{rank:05d}.json")) as f:
        return json.load(f).get("stopped_by")


if __name__ == "__main__":
    run_job(main)
