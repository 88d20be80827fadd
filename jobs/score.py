"""python -m jobs.score data.shards=… output.dir=… [key=value …]: score shards into Parquet."""

from __future__ import annotations

from dataclasses import replace

from hydra.utils import instantiate

from jobs._entry import multirun, run_job, to_plain
from pipeline.errors import EXIT_REQUEUE
from pipeline.settings import ScoreSettings, from_mapping


def main(cfg) -> int:
    config = to_plain(cfg, drop=("paths", "hydra", "bench", "mode"))
    settings = from_mapping(ScoreSettings, config)
    # torch and the rest load only now: a mistake in the config is reported without waiting for them
    from pipeline import cluster
    from pipeline.runner import score_and_report_stop

    launched = cluster.in_slurm_launcher_job() and multirun()
    settings = replace(settings, dist=cluster.launcher_dist(settings.dist, launched))
    code, stopped_by = score_and_report_stop(settings, resolved_config=config, build=instantiate)
    if code == EXIT_REQUEUE and launched and stopped_by == "SIGUSR1":
        cluster.requeue_with_launcher()  # exits; a stop by SIGTERM (scancel) is not requeued
    return code


if __name__ == "__main__":
    run_job(main)
