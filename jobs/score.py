"""python -m jobs.score data.shards=… output.dir=… [key=value …]: score shards into Parquet."""

from __future__ import annotations

from dataclasses import replace

from hydra.utils import instantiate

from jobs._entry import multirun, run_job, task_overrides, to_plain
from pipeline.errors import EXIT_REQUEUE, UserError
from pipeline.settings import ScoreSettings, from_mapping


def main(cfg) -> int:
    config = to_plain(cfg, drop=("paths", "hydra", "bench", "mode"))
    settings = from_mapping(ScoreSettings, config)
    if settings.models:
        given = [o for o in task_overrides() if o.lstrip("+~").split("=")[0].split(".")[0] == "model"]
        if given:
            raise UserError(f"{given[0]}: with models: given, model is not used; set models.<name>.… instead")
        config.pop("model", None)  # not part of this run: kept out of every file's config
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
