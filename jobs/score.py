"""python -m jobs.score data.shards=… output.dir=… [key=value …]: score shards into Parquet."""

from __future__ import annotations

from jobs._entry import run_job, to_plain
from pipeline.runner import score
from pipeline.settings import ScoreSettings, from_mapping


def main(cfg) -> int:
    config = to_plain(cfg, drop=("paths", "hydra", "bench", "mode"))
    settings = from_mapping(ScoreSettings, config)
    return score(settings, resolved_config=config)


if __name__ == "__main__":
    run_job(main)
