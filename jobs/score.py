"""python -m jobs.score data.shards=… output.dir=… [key=value …]: score shards into Parquet."""

from __future__ import annotations

import os

from hydra.utils import instantiate

from jobs._entry import launched_by_slurm_launcher, requeue_with_launcher, run_job, to_plain
from pipeline.errors import EXIT_REQUEUE
from pipeline.runner import score_and_report_stop
from pipeline.settings import ScoreSettings, from_mapping


def main(cfg) -> int:
    config = to_plain(cfg, drop=("paths", "hydra", "bench", "mode"))
    launched = launched_by_slurm_launcher()
    if launched and config["dist"].get("rank") is None and config["dist"].get("world_size") is None:
        # The launcher submits a sweep as one Slurm array whose tasks are separate runs, not ranks of one.
        env = os.environ
        config["dist"] = {"rank": int(env.get("SLURM_PROCID", 0)), "world_size": int(env.get("SLURM_NTASKS", 1))}
    settings = from_mapping(ScoreSettings, config)
    code, stopped_by = score_and_report_stop(settings, resolved_config=config, build=instantiate)
    if code == EXIT_REQUEUE and launched and stopped_by == "SIGUSR1":
        requeue_with_launcher()  # exits; a stop by SIGTERM (scancel) is not requeued
    return code


if __name__ == "__main__":
    run_job(main)
